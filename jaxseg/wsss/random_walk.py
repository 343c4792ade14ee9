"""Random-walk propagation of CAMs with a learned patch affinity (AFA, rulixiang/afa `utils/camutils.py`
`propagte_aff_cam_with_bkg`, and the labels its training script makes from it).

With A (B, P, P) the predicted affinity of P patches (`jaxseg.models.afa`):
  transition  A zeroed outside a radius mask (pairs more than `radius` cells apart on either axis), raised
              to `power` (2), each column divided by its sum + `eps` (0.1, "avoid nan"), then squared
              `num_log_iter` times (T <- T T; the official uses 0);
  propagation [background plane b, CAMs] soft-maxed over the background and the present classes, then
              multiplied by T: out[c, j] = sum_i p[c, i] T[i, j]; absent classes are 0.
`random_walk_pseudo_labels` is AFA's second label source (the training script's `refined_aff_label`): the
labelled CAMs resized to the affinity's grid, propagated with the low and the high background threshold,
resized back, refined by PAR at half resolution, and joined as `jaxseg.wsss.par.join_bands`. The official
cuts each crop to its image box before that PAR; here PAR runs on the whole (static-shape) crop and the
padding is ignored afterwards, so near the box's edges the padding's black pixels are neighbours too.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.ops.resize import resize
from jaxseg.wsss.par import DILATIONS, IGNORE, NUM_ITER, W1, W2, join_bands, par, present_argmax, with_background

Array = jax.Array


def radius_mask(grid: Sequence[int], radius: int) -> np.ndarray:
    """(P, P) bool over a row-major (rows, cols) grid: True where two cells are at most `radius` apart
    along both axes (the official `get_mask_by_radius`)."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    return (np.abs(rows[:, None] - rows[None]) <= radius) & (np.abs(cols[:, None] - cols[None]) <= radius)


def transition(affinity: Array, mask: Array | None = None, *, power: float = 2.0, eps: float = 0.1,
               num_log_iter: int = 0) -> Array:
    """The column-normalised transition matrix (B, P, P) of an affinity (module docstring)."""
    affinity = affinity.astype(jnp.float32)
    if mask is not None:
        affinity = jnp.where(jnp.asarray(mask, bool), affinity, 0.0)
    affinity = affinity ** power
    affinity = affinity / (affinity.sum(1, keepdims=True) + eps)
    for _ in range(num_log_iter):
        affinity = affinity @ affinity
    return affinity


def propagate_cams(cams: Array, affinity: Array, labels: Array, background: float, *, mask: Array | None = None,
                   power: float = 2.0, eps: float = 0.1, num_log_iter: int = 0) -> Array:
    """cams (B, C, h, w) on the affinity's grid (P = h * w), affinity (B, P, P), labels (B, C) multi-hot ->
    (B, 1 + C, h, w): the background and the classes after one random-walk step (module docstring)."""
    batch, classes, height, width = cams.shape
    if affinity.shape != (batch, height * width, height * width):
        raise UserError(f"the affinity must be (batch, P, P) with P = {height} x {width} CAM cells, got "
                        f"{affinity.shape}")
    scores, keys = with_background(cams.astype(jnp.float32), labels, background)
    probs = jax.nn.softmax(jnp.where(keys[:, :, None], scores.reshape(batch, classes + 1, -1), -jnp.inf), axis=1)
    steps = transition(affinity, mask, power=power, eps=eps, num_log_iter=num_log_iter)
    walked = jnp.einsum("bci,bij->bcj", probs, steps, precision=jax.lax.Precision.HIGHEST)
    return walked.reshape(batch, classes + 1, height, width)


def random_walk_pseudo_labels(images: Array, cams: Array, labels: Array, affinity: Array, grid: Sequence[int], *,
                              radius: int = 8, low: float = 0.35, high: float = 0.55, valid: Array | None = None,
                              ignore_index: int = IGNORE, dilations: Sequence[int] = DILATIONS,
                              num_iter: int = NUM_ITER, w1: float = W1, w2: float = W2) -> Array:
    """(B, H, W) int32 labels (0 background, c + 1 class c, `ignore_index`) from images (B, H, W, 3) (RGB in
    [0, 1]), normalised CAMs (B, C, H, W), labels (B, C), the affinity (B, P, P) of the patch `grid`
    (rows, cols) and valid (B, H, W) (module docstring)."""
    size = images.shape[1:3]
    small = (size[0] // 2, size[1] // 2)
    mask = radius_mask(grid, radius)
    labelled = cams.astype(jnp.float32) * jnp.asarray(labels, jnp.float32)[:, :, None, None]
    on_grid = resize(labelled, tuple(grid), axes=(2, 3))
    small_images = resize(images.astype(jnp.float32), small, axes=(1, 2))
    _, keys = with_background(cams, labels, 0.0)

    def band(threshold):
        walked = resize(propagate_cams(on_grid, affinity, labels, threshold, mask=mask), size, axes=(2, 3))
        # As the official, PAR itself brings the CAMs to the halved image (align_corners=True).
        refined = par(small_images, walked, dilations=dilations, num_iter=num_iter, w1=w1, w2=w2)
        return present_argmax(resize(refined, size, axes=(2, 3)), keys)

    joined = join_bands(band(high), band(low), ignore_index)
    return joined if valid is None else jnp.where(valid, joined, ignore_index)
