"""WeakTr stage 2's gradient-clipping cross-entropy (`segm/model/decoder.py` GradientClipping).

Per-pixel CE l (ignored pixels count as 0) is clipped at a detached threshold tau, so pixels whose loss
exceeds it contribute a constant and no gradient: the pixels most likely carrying wrong pseudo-labels
stop training the network. With l' = stopgrad(l):
  global   lam_g = mean of l' over all B*H*W pixels (ignored zeros included);
  gate     if lam_g > start_value the loss is plain CE (re-evaluated every batch);
  local    the batch-mean map mean_b l' is cut into patch_size x patch_size cells, lam_i = mean of a cell;
  tau      max(lam_i, lam_g), shared by the same cell of every image;
  loss     mean over all pixels of min(l, tau); the clipping mask is 1[l <= tau].
Sizes not divisible by the cell size: the last row/column of cells is partial and averages only its
pixels (average pooling that excludes padding). The original computes the cells with symmetric padding of
H mod patch_size, which agrees for divisible sizes and fails otherwise.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxseg.errors import UserError

Array = jax.Array


def pixel_cross_entropy(logits: Array, labels: Array, ignore_index: int = 255) -> Array:
    """(B, H, W) cross-entropy of (B, H, W, K) logits against (B, H, W) labels; 0 at ignored pixels."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0)


def _cell_means(loss_map: Array, cell: int) -> Array:
    """(H, W) -> (ceil(H / cell), ceil(W / cell)) means over the pixels of each cell."""
    height, width = loss_map.shape
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    pad = ((0, rows * cell - height), (0, cols * cell - width))
    sums = jnp.pad(loss_map, pad).reshape(rows, cell, cols, cell).sum((1, 3))
    counts = jnp.pad(jnp.ones_like(loss_map), pad).reshape(rows, cell, cols, cell).sum((1, 3))
    return sums / counts


@functools.partial(jax.jit, static_argnames=("patch_size", "start_value", "ignore_index"))
def gradient_clipping_loss(logits: Array, labels: Array, *, patch_size: int = 120,
                           start_value: float = 1.2, ignore_index: int = 255) -> tuple[Array, Array]:
    """Clipped cross-entropy of (B, H, W, K) logits against (B, H, W) pseudo-labels.

    Returns (scalar loss, (B, H, W) bool clipping mask: True where a pixel is back-propagated). Above the
    gate the loss is plain mean CE and the mask is all True.
    """
    if logits.ndim != 4 or labels.shape != logits.shape[:3]:
        raise UserError(f"logits must be (B, H, W, K) and labels (B, H, W); got {logits.shape}, {labels.shape}")
    loss = pixel_cross_entropy(logits, labels, ignore_index)
    detached = jax.lax.stop_gradient(loss)
    global_mean = detached.mean()
    cells = jnp.maximum(_cell_means(detached.mean(0), patch_size), global_mean)
    height, width = loss.shape[1:]
    tau = jnp.repeat(jnp.repeat(cells, patch_size, 0), patch_size, 1)[:height, :width]
    # where(l <= tau, l, tau) rather than minimum: at an exact tie the pixel keeps its full gradient, as
    # the original's clamp(l - tau, max=0) + tau does.
    kept = loss <= tau
    gated = global_mean > start_value
    clipped = jnp.where(gated | kept, loss, tau)
    return clipped.mean(), gated | kept
