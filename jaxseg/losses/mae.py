"""MAE's masking and reconstruction loss (He et al., "Masked Autoencoders Are Scalable Vision Learners";
facebookresearch/mae `models_mae.py`), pure and with static shapes: a fixed number of kept patches per
image, chosen by sorting per-patch noise.

Patches are flattened row-major over the patch grid, their pixels in (row, column, channel) order, as
MAE's `patchify` orders them. The mask is 1 on removed patches, 0 on kept ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxseg.errors import UserError


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: int(L * (1 - mask_ratio)), as MAE rounds it (at least one)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(int(num_patches * (1 - mask_ratio)), 1)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, rows * cols, p * p * C)."""
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise UserError(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """The inverse of `patchify`: (B, rows * cols, p * p * C) -> (B, rows * p, cols * p, C)."""
    rows, cols = grid
    batch = patches.shape[0]
    x = patches.reshape(batch, rows, cols, patch_size, patch_size, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * patch_size, cols * patch_size, -1)


def random_masking(noise: jax.Array, keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-image random masking by sorting `noise` (B, L) (MAE's `random_masking`): the `keep` patches of
    smallest noise are kept. Returns (ids_keep (B, keep): the kept patch indices in that order,
    ids_restore (B, L): where each patch sits in [kept..., removed...] order, mask (B, L) float32)."""
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = (ids_restore >= keep).astype(jnp.float32)
    return ids_shuffle[:, :keep], ids_restore, mask


def normalized_targets(patches: jax.Array, norm_pix: bool = True) -> jax.Array:
    """The regression targets: each patch's pixels, with `norm_pix` standardised by that patch's mean and
    unbiased variance (+ 1e-6), MAE's `norm_pix_loss`."""
    if not norm_pix:
        return patches
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)  # torch's Tensor.var is unbiased
    return (patches - mean) / jnp.sqrt(var + 1e-6)


def per_image_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over removed patches of each patch's mean squared error, number of removed patches), each
    (B,): a batch's loss is the ratio of their totals."""
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return (per_patch * mask).sum(axis=1), mask.sum(axis=1)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix: bool = True) -> jax.Array:
    """MAE's `forward_loss`: the mean over the removed patches of the batch of the per-patch mean squared
    error between `pred` (B, L, p * p * C) and the (normalised) pixels of `images` (B, H, W, C)."""
    total, count = per_image_loss(pred, normalized_targets(patchify(images, patch_size), norm_pix), mask)
    return total.sum() / count.sum()
