"""Gradient-weighted attention maps (GETAM: Sun et al., "GETAM: Gradient-weighted Element-wise Transformer
Attention Map for Weakly-supervised Semantic Segmentation", arXiv 2112.02841; weixuansun/GETAM
`DPT/DPT.py` generate_cam_2 with the attention hooks of `models/vision_transformer.py`) for any classifier
built on `jaxseg.models.vit.Block`: a ViT classifier with one class token, or WeakTr's multi-class-token
DeiT.

For the score s_c of class c and every block l >= start_layer, with A_l its softmax attention (heads, T, T)
and G_l = ds_c / dA_l the gradient of the score with respect to it:
    map_l = mean_heads(ReLU(G_l * A_l)) * mean_heads(ReLU(G_l))
(GETAM's "cam * gradient^2": the element-wise product's positive part, weighted again by the positive
gradient), summed over those blocks; class c's map is the row of its class token (the one class token of
a plain ViT: row 0 for every class; WeakTr: class c's own token, row c) over the patch-token columns.
GETAM backpropagates one class of one image at a time; here one forward pass serves all classes (the
backward pass is vmapped over the class one-hots; the images of a batch do not interact, so a one-hot over
the whole batch gives each image its own gradient). The official reads the pre-sigmoid logits of its
classification head and sums the blocks from start_layer 6 of 12 (`train_from_init.py`); its final ReLU is
left out, as the sum of products of positive parts is never negative.

The attention and its gradient come from `jaxseg.models.vit_taps` (no change to the model's forward pass).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.models.vit_taps import tap_attention

Array = jax.Array


def gradient_attention(score_fn: Callable[[], Any], class_rows: Sequence[int], num_prefix: int,
                       start_layer: int = 0, has_aux: bool = False) -> Array | tuple[Array, Any]:
    """GETAM maps (B, C, P) over the P patch tokens (the tokens after the first `num_prefix`).

    Args:
      score_fn: runs the model and returns its class scores (B, C) (with `has_aux`: (scores, aux)), e.g.
        `lambda: model.apply(variables, images)["cls_logits"]`; its blocks must not be rematerialised.
      class_rows: for each of the C classes, the token whose attention row makes its map.
      num_prefix: class and register tokens in front of the patch tokens.
      start_layer: the first block summed (GETAM: 6 of 12).
      has_aux: `score_fn` also returns something; it is returned after the maps.
    """
    def run(perturbations=None):
        result, taps = tap_attention(score_fn, perturbations=perturbations)
        scores, aux = result if has_aux else (result, None)
        return scores.astype(jnp.float32), (aux, taps)

    abstract = jax.eval_shape(run)[1][1]
    if not 0 <= start_layer < len(abstract):
        raise UserError(f"start_layer must lie in [0, {len(abstract) - 1}] for a model of {len(abstract)} "
                        f"attention blocks, got {start_layer}")
    zeros = [jnp.zeros(tap["values"].shape, tap["values"].dtype) for tap in abstract]
    scores, backward, (aux, taps) = jax.vjp(run, zeros, has_aux=True)
    batch, classes = scores.shape
    rows = np.asarray(class_rows)
    if rows.shape != (classes,):
        raise UserError(f"class_rows must name one token row for each of the {classes} scores, got {rows.shape}")
    one_hots = jnp.broadcast_to(jnp.eye(classes, dtype=scores.dtype)[:, None], (classes, batch, classes))
    (grads,) = jax.vmap(backward)(one_hots)  # per block: dscore_c / dY (C, B, T, heads, d)
    total = 0.0
    for layer in range(start_layer, len(taps)):
        heads_grad = grads[layer][np.arange(classes), :, rows].astype(jnp.float32)  # (C, B, heads, d)
        attention_grad = jnp.einsum("cbhd,bkhd->cbhk", heads_grad, taps[layer]["values"].astype(jnp.float32))
        attention = jnp.moveaxis(taps[layer]["probs"][:, :, rows], 2, 0)  # (C, B, heads, T)
        total = total + (jax.nn.relu(attention_grad * attention).mean(2) * jax.nn.relu(attention_grad).mean(2))
    maps = jnp.moveaxis(total, 0, 1)[..., num_prefix:]
    return (maps, aux) if has_aux else maps
