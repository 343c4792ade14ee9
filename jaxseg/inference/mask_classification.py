"""From mask-classification outputs (per-query class logits with a trailing "no object" class, and
per-query mask logits) to semantic, panoptic and instance predictions, as EoMT / Mask2Former evaluate.

All functions handle one image, have static output shapes and run under jit; vmap them over a batch.
Mask logits are expected at the resolution of the output (upsample them first).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxseg.errors import UserError

Array = jax.Array


def semantic_scores(class_logits: Array, mask_logits: Array) -> Array:
    """Per-pixel class scores S[c] = sum_q sigmoid(mask_q) * softmax(class_q)[c] over the K real
    classes (the no-object column is dropped, not renormalised).

    class_logits (Q, K+1), mask_logits (Q, H, W) -> (K, H, W).
    """
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
    return jnp.einsum("qk,qhw->khw", probs, jax.nn.sigmoid(mask_logits.astype(jnp.float32)))


def panoptic_segments(class_logits: Array, mask_logits: Array, is_thing: Sequence[bool] | Array, *,
                      score_threshold: float = 0.8, mask_threshold: float = 0.5,
                      overlap_threshold: float = 0.8, valid: Array | None = None) -> tuple[Array, Array]:
    """Panoptic segmentation of one image (Mask2Former / EoMT post-processing).

    Queries whose best class (over all K+1) is a real class with probability > score_threshold
    compete for pixels: each pixel goes to argmax_q score_q * sigmoid(mask_q). A kept query forms a
    segment of the pixels it owns where sigmoid(mask_q) >= mask_threshold, unless it owns nothing, its
    own mask is empty, or it owns less than overlap_threshold of its own mask. All segments of one stuff
    class merge into one (the first query in query order names it). Other pixels are void.

    Args:
      class_logits (Q, K+1), mask_logits (Q, H, W), is_thing (K,) booleans.
      valid: optional (H, W) bool, the image's pixels on a padded canvas (the padding owns nothing; give
        it mask logits of -inf).

    Returns:
      segment_ids (H, W) int32, 0 = void, q + 1 for the segment named by query q; and categories
      (Q + 1,) int32, the class of each segment id (-1 where the id is unused, index 0 included).
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    is_thing = jnp.asarray(is_thing, bool)
    if is_thing.shape != (num_classes,):
        raise UserError(f"is_thing must have one entry per class ({num_classes}), got {is_thing.shape}")
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    scores, labels = probs.max(-1), probs.argmax(-1)
    keep = (labels != num_classes) & (scores > score_threshold)
    mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    weighted = jnp.where(keep[:, None, None], scores[:, None, None] * mask_probs, -jnp.inf)
    owner = weighted.argmax(0)
    owned = owner[None] == jnp.arange(num_queries)[:, None, None]
    if valid is not None:
        owned &= valid[None]
    in_mask = mask_probs >= mask_threshold
    own_area = owned.sum((1, 2))
    mask_area = in_mask.sum((1, 2))
    final_area = (owned & in_mask).sum((1, 2))
    valid = (keep & (own_area > 0) & (mask_area > 0) & (final_area > 0)
             & (own_area >= overlap_threshold * mask_area))
    # Stuff queries of one class share the id of the first valid query of that class.
    same_stuff = (labels[:, None] == labels[None, :]) & ~is_thing[labels][:, None] & valid[None, :]
    first_of_class = jnp.argmax(same_stuff, axis=1)  # the lowest valid query index with the same label
    segment_of_query = jnp.where(is_thing[labels], jnp.arange(num_queries), first_of_class) + 1
    segment_of_query = jnp.where(valid, segment_of_query, 0)
    pixel_query_valid = valid[owner] & jnp.take_along_axis(in_mask, owner[None], 0)[0]
    segment_ids = jnp.where(pixel_query_valid, segment_of_query[owner], 0).astype(jnp.int32)
    categories = jnp.full((num_queries + 1,), -1, jnp.int32)
    categories = categories.at[segment_of_query].set(jnp.where(valid, labels, -1).astype(jnp.int32),
                                                     mode="drop")
    # Index 0 may have been written by invalid queries (segment 0); it always means void.
    categories = categories.at[0].set(-1)
    return segment_ids, categories


def instance_predictions(class_logits: Array, mask_logits: Array, num_instances: int = 100
                         ) -> tuple[Array, Array, Array]:
    """Top (query, class) pairs of one image as instances (EoMT's instance evaluation).

    Class probabilities are the softmax over K+1 with the no-object column dropped (no renormalisation);
    the top `num_instances` of the Q x K pairs are kept; each mask is logit > 0 and the score is the
    class probability times the mean sigmoid inside that mask.

    Returns (masks (N, H, W) bool, classes (N,) int32, scores (N,) float32), N = min(num_instances, Q*K).
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
    top_scores, flat = jax.lax.top_k(probs.reshape(-1), min(num_instances, num_queries * num_classes))
    queries, classes = flat // num_classes, flat % num_classes
    logits = mask_logits[queries].astype(jnp.float32)
    masks = logits > 0
    mask_scores = (jax.nn.sigmoid(logits) * masks).sum((1, 2)) / (masks.sum((1, 2)) + 1e-6)
    return masks, classes.astype(jnp.int32), top_scores * mask_scores

