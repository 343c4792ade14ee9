"""PAR, pixel-adaptive refinement (Ru et al., "Learning Affinity from Attention", CVPR 2022; rulixiang/afa
`wetr/PAR.py`, the same in rulixiang/ToCo `model/PAR.py`): CAMs diffused over the image's own colours.

Each pixel looks at K = 8 x len(dilations) neighbours: the 8 cells of a 3x3 kernel around it at every
dilation d (replicate padding at the borders). Their weights:
  colour    per channel, -(|I_n - I| / (std_n I_n + 1e-8) / w1)^2, where std_n is the unbiased standard
            deviation of the K neighbours' values; averaged over the channels and soft-maxed over the K
            neighbours;
  position  the same with the neighbours' distances (d or d sqrt 2) in place of the colour differences,
            soft-maxed over K, the same for every pixel, times w2;
  weight    colour + w2 * position (the weights of a pixel sum to 1 + w2).
The CAMs are resized to the image (bilinear, align_corners=True), then `num_iter` times replaced by the
weighted sum of their neighbours. The weights come from the image alone, so any CAM (WeakTr's, CLIP-ES's,
AFA's) can be refined; the official values are dilations (1, 2, 4, 8, 12, 24), 10 iterations, w1 = 0.3,
w2 = 0.01, on RGB in [0, 1] at half the crop's resolution (the colour term is invariant to the images'
scale and offset up to the 1e-8).

Layouts: images (B, H, W, 3), the library's NHWC; CAMs (B, C, h, w), as `jaxseg.wsss.cam` and
`jaxseg.wsss.clip_es` give them (one image's (C, H, W) is `cams[None]`). Example, refining the "cams" of
WeakTr's or CLIP-ES's predictor for one uint8 image (C, H, W at the image size, absent classes 0) and
relabelling them at a background threshold (tests/test_afa_parity.py runs it on WeakTr's):

    from jaxseg.wsss.cam import normalize_cams, pseudo_label
    from jaxseg.wsss.par import par
    refined = par(image[None] / 255, cams[None])[0]                      # (C, H, W)
    labels = pseudo_label(normalize_cams(refined, present), present, threshold)

`par_pseudo_labels` is AFA's label maker (`refine_cams_with_bkg_v2`): a background plane at a low and a
high threshold, a softmax over the present classes, PAR at half resolution, and the two argmaxes joined
into background / class / ignored.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.ops.resize import resize

Array = jax.Array

DILATIONS = (1, 2, 4, 8, 12, 24)
NUM_ITER = 10
W1, W2 = 0.3, 0.01
IGNORE = 255
# The 8 neighbours of a 3x3 kernel in row-major order, as (row, column) steps of one dilation.
_STEPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _check(dilations: Sequence[int]) -> tuple[int, ...]:
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise UserError(f"PAR dilations must be a non-empty list of integers >= 1, got {dilations}")
    return dilations


def neighbours(x: Array, dilations: Sequence[int] = DILATIONS) -> Array:
    """(..., H, W) -> (..., K, H, W): each pixel's K = 8 x len(dilations) neighbours, dilation-major, the
    image border replicated (PyTorch's `mode="replicate"` padding, as indices clamped to the image). One
    gather: XLA compiles it several times faster than 48 padded slices."""
    height, width = x.shape[-2:]
    dilations = _check(dilations)
    rows = np.asarray([dy * d for d in dilations for dy, _ in _STEPS])[:, None] + np.arange(height)
    cols = np.asarray([dx * d for d in dilations for _, dx in _STEPS])[:, None] + np.arange(width)
    rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    return x[..., rows[:, :, None], cols[:, None, :]]


def par_weights(images: Array, dilations: Sequence[int] = DILATIONS, w1: float = W1, w2: float = W2) -> Array:
    """(B, K, H, W) float32 neighbour weights of (B, H, W, channels) images (the module docstring)."""
    if images.ndim != 4:
        raise UserError(f"PAR images must be (batch, height, width, channels), got shape {images.shape}")
    dilations = _check(dilations)
    x = jnp.moveaxis(images.astype(jnp.float32), -1, 1)  # (B, ch, H, W)
    near = neighbours(x, dilations)  # (B, ch, K, H, W)
    spread = jnp.std(near, axis=2, ddof=1, keepdims=True)
    colour = -(jnp.abs(near - x[:, :, None]) / (spread + 1e-8) / w1) ** 2
    distance = np.concatenate([d * np.asarray([np.sqrt(2), 1, np.sqrt(2), 1, 1, np.sqrt(2), 1, np.sqrt(2)],
                                              np.float32) for d in dilations])
    position = -(distance / (distance.std(ddof=1) + 1e-8) / w1) ** 2
    position = jax.nn.softmax(jnp.asarray(position, jnp.float32))[:, None, None]
    return jax.nn.softmax(colour.mean(1), axis=1) + w2 * position


def par(images: Array, cams: Array, *, dilations: Sequence[int] = DILATIONS, num_iter: int = NUM_ITER,
        w1: float = W1, w2: float = W2) -> Array:
    """Refined CAMs (B, C, H, W) at the images' size: `cams` (B, C, h, w) resized (bilinear, align_corners)
    to the images (B, H, W, channels), then `num_iter` weighted neighbour sums (the module docstring)."""
    if cams.ndim != 4 or cams.shape[0] != images.shape[0]:
        raise UserError(f"PAR cams must be (batch, classes, height, width) with the images' batch "
                        f"{images.shape[0]}, got shape {cams.shape}")
    if num_iter < 0:
        raise UserError(f"PAR num_iter must be >= 0, got {num_iter}")
    weights = par_weights(images, dilations, w1, w2)[:, None]  # (B, 1, K, H, W)
    cams = resize(cams.astype(jnp.float32), images.shape[1:3], axes=(2, 3), align_corners=True)
    return jax.lax.fori_loop(0, num_iter, lambda _, c: (neighbours(c, dilations) * weights).sum(2), cams)


def with_background(cams: Array, labels: Array, background: float) -> tuple[Array, Array]:
    """([background plane, cams] (B, 1 + C, ...), present keys (B, 1 + C) bool, the background always)."""
    plane = jnp.full(cams.shape[:1] + (1,) + cams.shape[2:], background, cams.dtype)
    keys = jnp.concatenate([jnp.ones(labels.shape[:1] + (1,), bool), jnp.asarray(labels) > 0], axis=1)
    return jnp.concatenate([plane, cams], axis=1), keys


def present_argmax(scores: Array, keys: Array) -> Array:
    """(B, K, H, W) scores -> (B, H, W) int32 index of the best present key."""
    return jnp.argmax(jnp.where(keys[:, :, None, None], scores, -jnp.inf), axis=1).astype(jnp.int32)


def join_bands(high: Array, low: Array, ignore_index: int = IGNORE) -> Array:
    """AFA's two-threshold label: the label under the high background threshold where it is a class,
    background where both thresholds give background, ignored where only the high one does."""
    return jnp.where(high > 0, high, jnp.where(low == 0, 0, ignore_index)).astype(jnp.int32)


def par_pseudo_labels(images: Array, cams: Array, labels: Array, *, low: float = 0.35, high: float = 0.55,
                      valid: Array | None = None, down_scale: int = 2, ignore_index: int = IGNORE,
                      dilations: Sequence[int] = DILATIONS, num_iter: int = NUM_ITER, w1: float = W1,
                      w2: float = W2) -> Array:
    """AFA's refined pseudo-labels (B, H, W) int32: 0 background, c + 1 class c, `ignore_index` uncertain.

    images (B, H, W, 3) (AFA: RGB in [0, 1]); cams (B, C, H, W) normalised to [0, 1]; labels (B, C)
    multi-hot; valid (B, H, W) bool, False where the crop is padding (labelled `ignore_index`). For each
    background threshold t in (low, high): [t plane, cams] resized by 1 / down_scale, soft-maxed over the
    background and the present classes, refined by PAR against the resized images, resized back, argmax
    over the present keys; then `join_bands`."""
    size = images.shape[1:3]
    small = (size[0] // down_scale, size[1] // down_scale)
    small_images = resize(images.astype(jnp.float32), small, axes=(1, 2))

    def band(threshold):
        scores, keys = with_background(cams.astype(jnp.float32), labels, threshold)
        scores = resize(scores, small, axes=(2, 3))
        probs = jax.nn.softmax(jnp.where(keys[:, :, None, None], scores, -jnp.inf), axis=1)
        refined = par(small_images, probs, dilations=dilations, num_iter=num_iter, w1=w1, w2=w2)
        return present_argmax(resize(refined, size, axes=(2, 3)), keys)

    joined = join_bands(band(high), band(low), ignore_index)
    return joined if valid is None else jnp.where(valid, joined, ignore_index)
