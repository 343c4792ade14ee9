"""DINOv3's axial rotary position embedding (RoPE), numerically as facebookresearch/dinov3
`RopePositionEmbedding` and transformers' `DINOv3ViTRopePositionEmbedding` compute it.

Patch centres get (y, x) coordinates in [-1, 1]; each head's channels are rotated in pairs (i, i + D/2)
by angles 2*pi * coordinate / period, with D/4 periods base^(4j/D) per axis: the first D/4 angles follow
y, the next D/4 follow x, and the D/2 angles are tiled twice ("rotate half" pairing). Only patch tokens
are rotated; class, register and query tokens in front of them are left as they are.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxseg.errors import UserError

NORMALIZE_MODES = ("separate", "min", "max")


def patch_coordinates(grid: tuple[int, int], normalize: str = "separate") -> jax.Array:
    """(rows * cols, 2) patch-centre (y, x) coordinates, row-major, in [-1, 1] along the axis that sets
    the scale: each axis by its own length ("separate"), or both by the shorter ("min") or longer ("max")."""
    if normalize not in NORMALIZE_MODES:
        raise UserError(f"rope_normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    rows, cols = grid
    scale = {"separate": (rows, cols), "min": (min(grid),) * 2, "max": (max(grid),) * 2}[normalize]
    ys = jnp.arange(0.5, rows, dtype=jnp.float32) / scale[0]
    xs = jnp.arange(0.5, cols, dtype=jnp.float32) / scale[1]
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return 2.0 * coords - 1.0


def augment_coordinates(coords: jax.Array, rng: jax.Array, *, shift: float | None = None,
                        jitter: float | None = None, rescale: float | None = None) -> jax.Array:
    """DINOv3's training-time coordinate augmentation, one draw per forward pass: add a uniform shift in
    [-shift, shift] per axis, multiply each axis by a log-uniform factor in [1/jitter, jitter], then both
    by one log-uniform factor in [1/rescale, rescale]."""
    shift_rng, jitter_rng, rescale_rng = jax.random.split(rng, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(shift_rng, (1, 2), minval=-shift, maxval=shift)
    if jitter is not None:
        log_range = math.log(jitter)
        coords = coords * jnp.exp(jax.random.uniform(jitter_rng, (1, 2), minval=-log_range, maxval=log_range))
    if rescale is not None:
        log_range = math.log(rescale)
        coords = coords * jnp.exp(jax.random.uniform(rescale_rng, (), minval=-log_range, maxval=log_range))
    return coords


def rope_tables(coords: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (num_patches, head_dim) in float32, for (num_patches, 2) coordinates."""
    if head_dim % 4:
        raise UserError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    periods = base ** (4.0 * jnp.arange(head_dim // 4, dtype=jnp.float32) / head_dim)
    angles = 2.0 * jnp.pi * coords[:, :, None] / periods
    angles = jnp.tile(angles.reshape(coords.shape[0], head_dim // 2), 2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the last P tokens of x (B, N, heads, head_dim) for tables of P patches; the N - P tokens in
    front (class, registers, queries) stay unrotated. Computed in float32, returned in x's dtype."""
    num_patches = cos.shape[0]
    prefix, patches = x[:, :x.shape[1] - num_patches], x[:, x.shape[1] - num_patches:]
    patches32 = patches.astype(jnp.float32)
    first, second = jnp.split(patches32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    table = (slice(None), None)  # broadcast the (P, head_dim) tables over the heads
    patches = (patches32 * cos[table] + rotated * sin[table]).astype(x.dtype)
    return jnp.concatenate([prefix, patches], axis=1)
