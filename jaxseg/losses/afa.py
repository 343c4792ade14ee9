"""AFA's losses (rulixiang/afa `utils/losses.py`, `utils/camutils.py` cams_to_affinity_label,
`scripts/dist_train_voc.py`): the affinity labels and loss, and the background / foreground balanced
cross-entropy of the segmentation head. The classification loss is `jaxseg.losses.multilabel`'s soft
margin; the weights and the schedule (classification alone at first, then + 0.1 segmentation + 0.1
affinity) are the method's (`jaxseg.methods.afa`)."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.losses.gradient_clipping import pixel_cross_entropy

Array = jax.Array
IGNORE = 255


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's `F.interpolate(mode="nearest")` source index of each output index along one axis."""
    return np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int64), in_size - 1)


def affinity_labels(labels: Array, grid: Sequence[int], mask: Array | None = None,
                    ignore_index: int = IGNORE) -> Array:
    """Pairwise labels (B, P, P) int32 of (B, H, W) pseudo-labels on the patch `grid` (rows, cols): the
    labels sampled at the grid (nearest), 1 where two cells agree (two background cells included), 0
    where they differ, `ignore_index` where either cell is ignored or the pair is outside `mask` (P, P)."""
    rows = nearest_indices(labels.shape[1], grid[0])
    cols = nearest_indices(labels.shape[2], grid[1])
    cells = labels[:, rows[:, None], cols[None, :]].reshape(labels.shape[0], -1)
    pairs = (cells[:, :, None] == cells[:, None, :]).astype(jnp.int32)
    ignored = (cells == ignore_index)[:, :, None] | (cells == ignore_index)[:, None, :]
    if mask is not None:
        ignored = ignored | ~jnp.asarray(mask, bool)
    return jnp.where(ignored, ignore_index, pairs)


def affinity_loss(affinity: Array, targets: Array) -> tuple[Array, dict[str, Array]]:
    """0.5 sum_pos (1 - a) / (n_pos + 1) + 0.5 sum_neg a / (n_neg + 1) over the whole batch: predicted
    affinity a (B, P, P) in [0, 1] against `affinity_labels`. Returns (loss, {"positive_pairs",
    "negative_pairs"})."""
    if affinity.shape != targets.shape:
        raise UserError(f"affinity {affinity.shape} and its labels {targets.shape} must have the same shape")
    affinity = affinity.astype(jnp.float32)
    positive, negative = targets == 1, targets == 0
    pos_count, neg_count = positive.sum() + 1, negative.sum() + 1
    loss = (0.5 * jnp.where(positive, 1 - affinity, 0.0).sum() / pos_count
            + 0.5 * jnp.where(negative, affinity, 0.0).sum() / neg_count)
    return loss, {"positive_pairs": pos_count - 1, "negative_pairs": neg_count - 1}


def balanced_cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE) -> Array:
    """AFA's segmentation loss: the mean cross-entropy of (B, H, W, K) logits over the background pixels
    (label 0) and over the foreground ones, averaged. An empty side counts 0 (PyTorch's gives NaN)."""
    loss = pixel_cross_entropy(logits, labels, ignore_index)
    valid = labels != ignore_index

    def side(pixels):
        return jnp.where(pixels, loss, 0.0).sum() / jnp.maximum(pixels.sum(), 1)
    return 0.5 * (side(valid & (labels == 0)) + side(valid & (labels != 0)))
