"""Mask2Former's set loss as EoMT trains with it, as pure jit-able functions with static shapes.

Targets are padded to a static G per image: masks (B, G, H, W) at input resolution, labels (B, G) and a
validity mask (B, G). For each prediction layer, independently:
  1. matching: one set of uniform points per image, shared by all queries and targets; cost =
     mask_weight * pairwise BCE + class_weight * (-p(class)) + dice_weight * pairwise dice on the sampled
     values, under stop_gradient in float32; exact Hungarian matching (`jaxseg.matching`).
  2. mask losses on the matched pairs: importance-sampled points (3x oversampling, 75% most uncertain,
     the rest uniform), sigmoid BCE (mean over points) and dice, summed over pairs and divided by the
     number of valid targets in the (global) batch.
  3. class loss: cross-entropy over all queries, unmatched ones targeting "no object" (index K), class
     weights 1 and `no_object_weight`, normalised by the sum of the weights of the targets.
Total = sum over layers of mask_weight * BCE + dice_weight * dice + class_weight * CE.
Under a sharded jit the sums run over the global batch, which is what EoMT's all-reduced normaliser
computes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError
from jaxseg.matching import Matching, match
from jaxseg.ops.point_sample import importance_point_counts, point_sample, select_uncertain_points

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SetLossConfig:
    """The set loss of Mask2Former / EoMT: `num_points` sampled per mask (the uncertain
    `importance_sample_ratio` of them chosen among `oversample_ratio` x as many candidates), the weights of
    the class, mask (BCE) and dice terms and of the "no object" class, and the `matcher` of `match`."""
    num_points: int = setting(12544, ">= 1")
    oversample_ratio: float = setting(3.0, ">= 1")
    importance_sample_ratio: float = setting(0.75, "in [0, 1]")
    no_object_weight: float = setting(0.1, "finite and >= 0")
    class_weight: float = setting(2.0, "finite and >= 0")
    mask_weight: float = setting(5.0, "finite and >= 0")
    dice_weight: float = setting(5.0, "finite and >= 0")
    matcher: str = "hungarian"

    def __post_init__(self):
        check_rules(self)


class Targets(NamedTuple):
    masks: Array  # (B, G, H, W) float or bool
    labels: Array  # (B, G) int, class ids in [0, K)
    valid: Array  # (B, G) bool, False for padding


class LayerDraws(NamedTuple):
    """The random points one prediction layer uses (injectable, e.g. to replay PyTorch's draws)."""
    match_points: Array  # (B, P, 2): shared by all queries and targets of an image
    candidates: Array  # (B, G, P * oversample, 2): importance-sampling candidates per target slot
    fresh: Array  # (B, G, P - P_uncertain, 2): uniform points appended per target slot


def draw_points(key: Array, batch: int, num_targets: int, config: SetLossConfig) -> LayerDraws:
    num_candidates, num_uncertain = importance_point_counts(
        config.num_points, config.oversample_ratio, config.importance_sample_ratio)
    keys = jax.random.split(key, 3)
    return LayerDraws(
        jax.random.uniform(keys[0], (batch, config.num_points, 2)),
        jax.random.uniform(keys[1], (batch, num_targets, num_candidates, 2)),
        jax.random.uniform(keys[2], (batch, num_targets, config.num_points - num_uncertain, 2)))


def _bce_with_logits(logits: Array, targets: Array) -> Array:
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def matching_cost(class_logits: Array, mask_logits: Array, targets: Targets, points: Array,
                  config: SetLossConfig) -> Array:
    """(B, Q, G) matching cost (float32, no gradient); `points` (B, P, 2) shared per image."""
    class_logits, mask_logits, points = jax.lax.stop_gradient((class_logits, mask_logits, points))
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    labels = jnp.clip(targets.labels, 0, probs.shape[-1] - 1)
    cost_class = -jnp.take_along_axis(probs, labels[:, None, :], axis=-1)  # (B, Q, G)
    shared = points[:, None]  # one point set per image, broadcast over queries / targets
    pred = point_sample(mask_logits.astype(jnp.float32), shared)  # (B, Q, P)
    tgt = point_sample(targets.masks.astype(jnp.float32), shared)  # (B, G, P)
    num_points = points.shape[1]
    cost_mask = (jnp.einsum("bqp,bgp->bqg", _bce_with_logits(pred, 1.0), tgt)
                 + jnp.einsum("bqp,bgp->bqg", _bce_with_logits(pred, 0.0), 1 - tgt)) / num_points
    sig = jax.nn.sigmoid(pred)
    cost_dice = 1 - (2 * jnp.einsum("bqp,bgp->bqg", sig, tgt) + 1) / (
        sig.sum(-1)[:, :, None] + tgt.sum(-1)[:, None, :] + 1)
    return (config.mask_weight * cost_mask + config.class_weight * cost_class
            + config.dice_weight * cost_dice)


def layer_loss(class_logits: Array, mask_logits: Array, targets: Targets, draws: LayerDraws,
               config: SetLossConfig) -> tuple[dict[str, Array], Matching]:
    """Loss terms of one prediction layer: {"mask", "dice", "class"} (unweighted) and the matching.

    class_logits (B, Q, K+1), mask_logits (B, Q, h, w) at any resolution (points are normalised).
    """
    batch, num_classes = class_logits.shape[0], class_logits.shape[2] - 1
    cost = matching_cost(class_logits, mask_logits, targets, draws.match_points, config)
    matching = match(cost, targets.valid, method=config.matcher)
    num_masks = jnp.maximum(targets.valid.sum().astype(jnp.float32), 1.0)

    # Mask losses, one row per target slot (padded / unmatched slots weigh zero).
    num_targets = targets.labels.shape[1]
    pred = jnp.take_along_axis(mask_logits, matching.query_of_target[:, :, None, None], axis=1)
    flat = pred.reshape(batch * num_targets, *pred.shape[2:])
    _, num_uncertain = importance_point_counts(config.num_points, config.oversample_ratio,
                                               config.importance_sample_ratio)
    points = select_uncertain_points(
        flat, draws.candidates.reshape(batch * num_targets, -1, 2),
        draws.fresh.reshape(batch * num_targets, -1, 2), num_uncertain)
    logits = point_sample(flat.astype(jnp.float32), points)  # (B*G, P)
    labels = point_sample(targets.masks.astype(jnp.float32).reshape(batch * num_targets,
                                                                    *targets.masks.shape[2:]), points)
    weight = matching.matched.reshape(-1).astype(jnp.float32)
    bce = _bce_with_logits(logits, labels).mean(-1)
    probs = jax.nn.sigmoid(logits)
    dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)

    # Classification over all queries.
    matched_labels = jnp.take_along_axis(targets.labels, jnp.maximum(matching.target_of_query, 0), axis=1)
    target_class = jnp.where(matching.target_of_query >= 0, matched_labels, num_classes)
    class_weights = jnp.where(target_class == num_classes, config.no_object_weight, 1.0)
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
    terms = {"mask": (bce * weight).sum() / num_masks,
             "dice": (dice * weight).sum() / num_masks,
             "class": (nll * class_weights).sum() / class_weights.sum()}
    return terms, matching


def set_loss(class_logits: Array, mask_logits: Array, targets: Targets, key: Array,
             config: SetLossConfig = SetLossConfig()) -> tuple[Array, dict[str, Array]]:
    """Total loss over all prediction layers and per-layer terms.

    Args:
      class_logits: (L, B, Q, K+1); mask_logits: (L, B, Q, h, w): EoMT's stacked predictions.
      targets: padded `Targets`.
      key: PRNG key for the sampled points (each layer draws its own).

    Returns:
      (scalar loss, {"mask", "dice", "class": (L,) unweighted terms per layer}).
    """
    if class_logits.ndim != 4 or mask_logits.ndim != 5:
        raise UserError(f"expected stacked predictions (L, B, Q, K+1) and (L, B, Q, h, w), got "
                        f"{class_logits.shape} and {mask_logits.shape}")
    if targets.masks.ndim != 4 or targets.labels.shape != targets.masks.shape[:2] or \
            targets.valid.shape != targets.labels.shape:
        raise UserError(f"targets must be masks (B, G, H, W), labels and valid (B, G); got "
                        f"{targets.masks.shape}, {targets.labels.shape}, {targets.valid.shape}")
    batch, num_targets = targets.labels.shape
    per_layer = []
    for layer, layer_key in enumerate(jax.random.split(key, class_logits.shape[0])):
        draws = draw_points(layer_key, batch, num_targets, config)
        per_layer.append(layer_loss(class_logits[layer], mask_logits[layer], targets, draws, config)[0])
    terms = {name: jnp.stack([t[name] for t in per_layer]) for name in ("mask", "dice", "class")}
    total = (config.mask_weight * terms["mask"].sum() + config.dice_weight * terms["dice"].sum()
             + config.class_weight * terms["class"].sum())
    return total, terms
