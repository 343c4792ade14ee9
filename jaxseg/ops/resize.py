"""Resizing with PyTorch's `F.interpolate` semantics (align_corners=False; True for plain bilinear).

`jax.image.resize` differs from PyTorch where parity matters: it antialiases every downsample, its
cubic kernel uses Keys' a=-0.5 where PyTorch's plain bicubic uses a=-0.75, and it treats borders
differently. Checkpoints trained in PyTorch (timm position embeddings, FlexiViT kernels, EoMT mask
logits) need PyTorch's exact numbers, so each resize here is a pair of (out, in) interpolation
matrices built in float64 numpy from static shapes and applied with two tensor contractions: exact,
jit-friendly, and differentiable with respect to the input.

`pil_resize` is Pillow's own bicubic resize of 8-bit images (WeakTr rescales its CAM inputs with it),
exact: Pillow's weights rounded to its fixed point and applied in integer arithmetic.
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


def _aligned_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's bilinear `align_corners=True`: the corner pixels of input and output coincide, source index
    i * (in - 1) / (out - 1) (0 for a single output)."""
    src = np.arange(out_size) * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    left = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    frac = src - left
    right = np.minimum(left + 1, in_size - 1)
    mat = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(mat, (rows, left), 1.0 - frac)
    np.add.at(mat, (rows, right), frac)
    return mat


def _pil_filter(x: float, method: str) -> float:
    """Pillow's bilinear and bicubic (a = -0.5) filters, in its order of operations."""
    x = abs(x)
    if method == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


def _pil_weights(in_size: int, out_size: int, method: str) -> list[tuple[int, list[float]]]:
    """Pillow's `precompute_coeffs` over the whole input: per output index, the first input index and the
    normalised weights of the taps from there. The kernel is stretched by the downscale factor, taps
    outside the image are dropped and the rest renormalised. Computed in Pillow's order of operations
    (plain Python floats are its doubles): its 8-bit resampler rounds these weights to fixed point, where
    even the last bit of a double can show."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = (1.0 if method == "bilinear" else 2.0) * filterscale
    inverse = 1.0 / filterscale
    rows = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = [_pil_filter((x - center + 0.5) * inverse, method) for x in range(lo, hi)]
        total = 0.0
        for w in weights:  # sequentially, as Pillow sums them
            total += w
        rows.append((lo, [w / total for w in weights] if total != 0.0 else weights))
    return rows


def _antialiased_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """PyTorch's `_upsample_{bilinear,bicubic}2d_aa`, a port of Pillow's resampling (`_pil_weights`): the
    antialiased cubic uses a=-0.5 (PIL's), unlike the plain path."""
    mat = np.zeros((out_size, in_size))
    for i, (lo, weights) in enumerate(_pil_weights(in_size, out_size, method)):
        mat[i, lo:lo + len(weights)] = weights
    return mat


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str = "bilinear",
                         antialias: bool = False, scale_factor: float | None = None,
                         align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with resize(x) = M @ x along one axis.

    `scale_factor` reproduces `F.interpolate(scale_factor=...)`, whose sampling positions follow the given
    factor rather than out/in (the output size is still floor(in * factor)); plain resizing only.
    `align_corners`: `F.interpolate(..., align_corners=True)`, plain bilinear only (PAR resizes its CAMs so)."""
    if method not in METHODS:
        raise UserError(f"resize method must be one of {METHODS}, got {method!r}")
    if in_size < 1 or out_size < 1:
        raise UserError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    if align_corners:
        if method != "bilinear" or antialias or scale_factor is not None:
            raise UserError("align_corners is supported for plain bilinear resizing to a size only")
        mat = _aligned_matrix(in_size, out_size)
    elif scale_factor is not None:
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
           scale_factors: Sequence[float] | None = None, align_corners: bool = False) -> jax.Array:
    """Resize `x` along `axes` (default: H, W of an NHWC array) to `size`, like
    `torch.nn.functional.interpolate(..., mode=method, align_corners=align_corners, antialias=antialias)`;
    with `scale_factors`, like `interpolate(scale_factor=...)` whose output size is `size`."""
    if len(size) != len(axes) or (scale_factors is not None and len(scale_factors) != len(axes)):
        raise UserError(f"size {tuple(size)} must give one length per resized axis {tuple(axes)}")
    for i, (axis, out_size) in enumerate(zip(axes, size)):
        in_size = x.shape[axis]
        factor = None if scale_factors is None else float(scale_factors[i])
        if in_size == out_size and factor in (None, 1.0):
            continue  # every method here is the identity at scale 1
        x = apply_matrix(x, interpolation_matrix(in_size, int(out_size), method, antialias, factor, align_corners),
                         axis)
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


# Pillow resamples 8-bit images in fixed point: weights times 2**22 (8 bits of result and 2 of headroom for
# the negative lobes in a 32-bit accumulator), rounded half away from zero.
PIL_PRECISION_BITS = 22


@functools.lru_cache(maxsize=256)
def _pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(input indices, int32 fixed-point weights), both (out_size, taps), of Pillow's 8-bit bicubic
    resampling along one axis; unused taps read the last pixel with weight 0."""
    rows = _pil_weights(in_size, out_size, "bicubic")
    taps = max(len(weights) for _, weights in rows)
    index = np.full((out_size, taps), in_size - 1, np.int32)
    fixed = np.zeros((out_size, taps), np.int32)
    for i, (lo, weights) in enumerate(rows):
        index[i, :len(weights)] = np.arange(lo, lo + len(weights))
        fixed[i, :len(weights)] = [int(w * (1 << PIL_PRECISION_BITS) + (0.5 if w >= 0 else -0.5)) for w in weights]
    index.flags.writeable = fixed.flags.writeable = False
    return index, fixed


def pil_resize(images: jax.Array, size: Sequence[int]) -> jax.Array:
    """Pillow's `Image.resize((w, h), Image.BICUBIC)` of 8-bit images, bit for bit: uint8 (..., H, W, C)
    -> uint8 (..., h, w, C) for `size` = (h, w). As Pillow, two passes, the first one's result rounded to
    8 bits; each output pixel is the fixed-point weighted sum of its taps plus half a unit, shifted down
    and clipped to [0, 255]. Integer arithmetic throughout, so it is exact on every backend and inside jit.

    The pass order is Pillow 13's (the pinned version): vertical first when the height shrinks by more
    than twice as many pixels as the width, else horizontal first. Pillow 12 and older always ran the
    horizontal pass first, so on such (tall, shrunk) images they round the intermediate differently."""
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim < 3:
        raise UserError(f"pil_resize takes uint8 images (..., height, width, channels), got {images.dtype} "
                        f"of shape {images.shape}")
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"pil_resize size must be (height, width), both >= 1, got {tuple(size)}")
    return _pil_resize(images, tuple(int(s) for s in size))


# One program per shape when called outside jit, where its many small integer ops would each compile.
@functools.partial(jax.jit, static_argnames="size")
def _pil_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    x = images.astype(jnp.int32)
    height, width = x.shape[-3:-1]
    passes = [(-2, int(size[1])), (-3, int(size[0]))]
    if 0 < height - size[0] and height - size[0] > 2 * (width - size[1]):
        passes.reverse()
    for axis, out_size in passes:
        in_size = x.shape[axis]
        if in_size == out_size:
            continue  # Pillow skips the pass: its weights would be the identity
        index, fixed = _pil_taps(in_size, out_size)
        rows = jnp.take(jnp.moveaxis(x, axis, -1), index, axis=-1)  # (..., out, taps)
        total = (rows * fixed).sum(-1) + (1 << (PIL_PRECISION_BITS - 1))
        x = jnp.moveaxis(jnp.clip(total >> PIL_PRECISION_BITS, 0, 255), -1, axis)
    return x.astype(jnp.uint8)
