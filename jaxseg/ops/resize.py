"""Resizing with PyTorch's `F.interpolate` semantics (align_corners=False).

`jax.image.resize` differs from PyTorch where parity matters: it antialiases every downsample, its
cubic kernel uses Keys' a=-0.5 where PyTorch's plain bicubic uses a=-0.75, and it treats borders
differently. Checkpoints trained in PyTorch (timm position embeddings, FlexiViT kernels, EoMT mask
logits) need PyTorch's exact numbers, so each resize here is a pair of (out, in) interpolation
matrices built in float64 numpy from static shapes and applied with two tensor contractions: exact,
jit-friendly, and differentiable with respect to the input.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError

METHODS = ("bilinear", "bicubic")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _plain_matrix(in_size: int, out_size: int, method: str, scale: float | None = None) -> np.ndarray:
    """PyTorch's `upsample_{bilinear,bicubic}2d`: half-pixel source index, border samples clamped.
    `scale` (input pixels per output pixel) defaults to in/out; F.interpolate(scale_factor=f) uses 1/f."""
    scale = in_size / out_size if scale is None else scale
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    mat = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # PyTorch clamps the linear source index, not the cubic one
        left = np.floor(src).astype(np.int64)
        frac = src - left
        right = np.minimum(left + 1, in_size - 1)
        np.add.at(mat, (rows, left), 1.0 - frac)
        np.add.at(mat, (rows, right), frac)
    else:
        left = np.floor(src).astype(np.int64)
        frac = src - left
        for tap in range(-1, 3):
            idx = np.clip(left + tap, 0, in_size - 1)
            np.add.at(mat, (rows, idx), _cubic(frac - tap, a=-0.75))
    return mat


def _antialiased_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """PyTorch's `_upsample_{bilinear,bicubic}2d_aa` (PIL-style): the kernel is stretched by the
    downscale factor, taps outside the image are dropped and the remaining weights renormalised.
    The antialiased cubic uses a=-0.5 (PIL's), unlike the plain path."""
    scale = in_size / out_size
    radius = 1.0 if method == "bilinear" else 2.0
    support = radius * max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    mat = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi) - center + 0.5) * invscale
        if method == "bilinear":
            w = np.maximum(0.0, 1.0 - np.abs(x))
        else:
            w = _cubic(x, a=-0.5)
        total = w.sum()
        mat[i, lo:hi] = w / total if total != 0 else w
    return mat


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str = "bilinear",
                         antialias: bool = False, scale_factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with resize(x) = M @ x along one axis.

    `scale_factor` reproduces `F.interpolate(scale_factor=...)`, whose sampling positions follow the given
    factor rather than out/in (the output size is still floor(in * factor)); plain resizing only."""
    if method not in METHODS:
        raise UserError(f"resize method must be one of {METHODS}, got {method!r}")
    if in_size < 1 or out_size < 1:
        raise UserError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    if scale_factor is not None:
        if antialias:
            raise UserError("scale_factor is supported for plain (non-antialiased) resizing only")
        mat = _plain_matrix(in_size, out_size, method, 1.0 / scale_factor)
    elif antialias:
        mat = _antialiased_matrix(in_size, out_size, method)
    else:
        mat = _plain_matrix(in_size, out_size, method)
    mat.flags.writeable = False
    return mat


def resize(x: jax.Array, size: Sequence[int], *, method: str = "bilinear",
           antialias: bool = False, axes: Sequence[int] = (-3, -2),
           scale_factors: Sequence[float] | None = None) -> jax.Array:
    """Resize `x` along `axes` (default: H, W of an NHWC array) to `size`, like
    `torch.nn.functional.interpolate(..., mode=method, align_corners=False, antialias=antialias)`;
    with `scale_factors`, like `interpolate(scale_factor=...)` whose output size is `size`."""
    if len(size) != len(axes) or (scale_factors is not None and len(scale_factors) != len(axes)):
        raise UserError(f"size {tuple(size)} must give one length per resized axis {tuple(axes)}")
    for i, (axis, out_size) in enumerate(zip(axes, size)):
        in_size = x.shape[axis]
        factor = None if scale_factors is None else float(scale_factors[i])
        if in_size == out_size and factor in (None, 1.0):
            continue  # every method here is the identity at scale 1
        x = apply_matrix(x, interpolation_matrix(in_size, int(out_size), method, antialias, factor), axis)
    return x


def apply_matrix(x: jax.Array, matrix, axis: int) -> jax.Array:
    """`matrix` (out, in) applied along `axis` of `x` (length in): the contraction every resize here is."""
    matrix = jnp.asarray(matrix, x.dtype)
    moved = jnp.einsum("...i,oi->...o", jnp.moveaxis(x, axis, -1), matrix, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(moved, -1, axis)


def padded_matrix(in_size: int, out_size: int, in_canvas: int, out_canvas: int, *,
                  method: str = "bilinear", antialias: bool = False, flip: bool = False) -> np.ndarray:
    """(out_canvas, in_canvas) float32: `interpolation_matrix(in_size, out_size)` in the top-left corner,
    zeros elsewhere. Applied to a canvas whose first `in_size` entries hold the data, it gives the resized
    data in the first `out_size` entries and zeros after: variable sizes inside one static shape, so
    images of different sizes share a batch and a compiled program. `flip` reverses the output order
    within the `out_size` entries (a horizontal flip of the resized data, taken inside the matrix)."""
    if in_size > in_canvas or out_size > out_canvas:
        raise UserError(f"a resize {in_size} -> {out_size} does not fit the canvas {in_canvas} -> {out_canvas}")
    matrix = np.zeros((out_canvas, in_canvas), np.float32)
    block = interpolation_matrix(in_size, out_size, method, antialias)
    matrix[:out_size, :in_size] = block[::-1] if flip else block
    return matrix
