"""Point sampling of mask logits, as Mask2Former's (and EoMT's) set loss does it.

`point_sample` reproduces detectron2's `point_sample`, i.e. `torch.nn.functional.grid_sample` with
`mode="bilinear", padding_mode="zeros", align_corners=False` on coordinates in [0, 1]: pixel
coordinate = u * size - 0.5 (half-pixel centres), and neighbours outside the image contribute zero.
Because coordinates are normalised, maps of different resolutions (stride-4 logits, full-resolution
targets) are sampled at the same physical points.

`importance_sample_points` is Mask2Former's `get_uncertain_point_coords_with_randomness` (transformers'
`Mask2FormerLoss.sample_points_using_uncertainty`) with uncertainty -|logit|. All counts are Python
ints, so every shape is static; the random draws live in a thin key-based wrapper around
`select_uncertain_points`, which takes them as arrays (tests feed it the draws of the PyTorch side).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError


def _check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point (cast masks to float first), got {x.dtype}")


def _sample_one(values: jax.Array, coords: jax.Array) -> jax.Array:
    """(H, W) map, (P, 2) coords -> (P,) samples in the dtype of `values`."""
    height, width = values.shape
    x = coords[:, 0] * width - 0.5
    y = coords[:, 1] * height - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    east, south = x - x0, y - y0
    west, north = 1.0 - east, 1.0 - south
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = values.reshape(-1)
    out = jnp.zeros(coords.shape[:1], values.dtype)
    for dy, wy in ((0, north), (1, south)):
        for dx, wx in ((0, west), (1, east)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            # Out-of-image neighbours are read at a clamped (valid) index and weighted by zero, which
            # keeps the gather in bounds and its transpose (a scatter-add) free of stray writes.
            index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
            out = out + jnp.where(inside, flat[index], 0.0) * (wy * wx).astype(values.dtype)
    return out


_sample = jnp.vectorize(_sample_one, signature="(h,w),(p,c)->(p)")


def point_sample(maps: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinearly sample `maps` at normalised points like detectron2's `point_sample`.

    Equal to `grid_sample` up to float32 rounding (about 1e-6 relative; XLA fuses multiply-adds).

    Args:
      maps: (..., H, W) floating maps, e.g. (N, H, W) mask logits or float target masks.
      coords: (..., P, 2) points in [0, 1] (points outside are allowed: their out-of-image neighbours
        read as zero). The last axis is (x, y) = (width, height) order.

    The leading axes of `maps` and `coords` broadcast NumPy-style without materialising the
    broadcast, so (N, H, W) with (N, P, 2) samples one point set per map, and (B, Q, H, W) with
    (B, 1, P, 2) samples one point set shared by all Q maps of an image.

    Returns:
      (broadcast leading axes..., P) samples with the dtype of `maps`. Positions are computed in
      float32 (or float64 for float64 coords) and the four-tap sum in at least float32, then cast
      back, so bfloat16 maps lose precision only in the final rounding.

    Coordinates are treated as constants (stop_gradient): the loss never learns where to sample, and
    the gradient of floor() would be meaningless anyway. The result is differentiable in `maps`.
    """
    maps, coords = jnp.asarray(maps), jnp.asarray(coords)
    _check_floating("maps", maps)
    _check_floating("coords", coords)
    if maps.ndim < 2:
        raise UserError(f"maps must have shape (..., H, W), got {maps.shape}")
    if coords.ndim < 2 or coords.shape[-1] != 2:
        raise UserError(f"coords must have shape (..., P, 2), got {coords.shape}")
    try:
        np.broadcast_shapes(maps.shape[:-2], coords.shape[:-2])
    except ValueError:
        raise UserError(f"leading axes of maps {maps.shape} and coords {coords.shape} do not "
                        "broadcast") from None
    coords = jax.lax.stop_gradient(coords.astype(jnp.promote_types(coords.dtype, jnp.float32)))
    accumulate = jnp.promote_types(maps.dtype, jnp.float32)
    return _sample(maps.astype(accumulate), coords).astype(maps.dtype)


def importance_point_counts(num_points: int, oversample_ratio: float = 3.0,
                            importance_sample_ratio: float = 0.75) -> tuple[int, int]:
    """(candidates drawn, uncertain points kept) per map, with Mask2Former's int() truncation."""
    if num_points < 1:
        raise UserError(f"num_points must be positive, got {num_points}")
    if oversample_ratio < 1:
        raise UserError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise UserError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    return int(num_points * oversample_ratio), int(importance_sample_ratio * num_points)


def _check_logits(logits: jax.Array) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise UserError(f"logits must have shape (N, H, W), got {logits.shape}")
    _check_floating("logits", logits)
    return logits


def select_uncertain_points(logits: jax.Array, candidates: jax.Array, fresh: jax.Array,
                            num_uncertain: int) -> jax.Array:
    """Deterministic core of `importance_sample_points`, with the uniform draws given as arrays.

    Args:
      logits: (N, H, W) mask logits.
      candidates: (N, C, 2) uniform points; the `num_uncertain` with the smallest |logit| are kept, in
        order of decreasing uncertainty (as `torch.topk` orders them).
      fresh: (N, R, 2) uniform points appended unchanged.
      num_uncertain: static count of kept candidates, <= C.

    Returns:
      (N, num_uncertain + R, 2) float32 points under stop_gradient. Uncertainty is ranked on float32
      samples even for bfloat16 logits, where ties would otherwise be common.
    """
    logits = jax.lax.stop_gradient(_check_logits(logits))
    candidates, fresh = jnp.asarray(candidates), jnp.asarray(fresh)
    n = logits.shape[0]
    for name, points in (("candidates", candidates), ("fresh", fresh)):
        if points.ndim != 3 or points.shape[0] != n or points.shape[2] != 2:
            raise UserError(f"{name} must have shape ({n}, P, 2), got {points.shape}")
    if not 0 <= num_uncertain <= candidates.shape[1]:
        raise UserError(f"num_uncertain={num_uncertain} must be in [0, {candidates.shape[1]}]")
    candidates = candidates.astype(jnp.float32)
    uncertainty = -jnp.abs(point_sample(logits.astype(jnp.float32), candidates))
    _, index = jax.lax.top_k(uncertainty, num_uncertain)
    uncertain = jnp.take_along_axis(candidates, index[..., None], axis=1)
    return jax.lax.stop_gradient(jnp.concatenate([uncertain, fresh.astype(jnp.float32)], axis=1))


def importance_sample_points(key: jax.Array, logits: jax.Array, num_points: int,
                             oversample_ratio: float = 3.0,
                             importance_sample_ratio: float = 0.75) -> jax.Array:
    """Mask2Former's uncertainty-based point sampling for the mask losses.

    Draws int(num_points * oversample_ratio) uniform points in [0, 1)^2 per map, keeps the
    int(importance_sample_ratio * num_points) with the most uncertain logit (smallest |logit|) and
    appends fresh uniform points up to `num_points`.

    Args:
      key: PRNG key.
      logits: (N, H, W) mask logits (one map per matched prediction).
      num_points, oversample_ratio, importance_sample_ratio: Python numbers (static shapes).

    Returns:
      (N, num_points, 2) float32 (x, y) points under stop_gradient, uncertain points first.
    """
    num_candidates, num_uncertain = importance_point_counts(num_points, oversample_ratio,
                                                            importance_sample_ratio)
    n = _check_logits(logits).shape[0]
    candidate_key, fresh_key = jax.random.split(key)
    candidates = jax.random.uniform(candidate_key, (n, num_candidates, 2), jnp.float32)
    fresh = jax.random.uniform(fresh_key, (n, num_points - num_uncertain, 2), jnp.float32)
    return select_uncertain_points(logits, candidates, fresh, num_uncertain)
