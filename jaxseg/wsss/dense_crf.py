"""Dense CRF in JAX: pydensecrf's mean-field inference as a pure function, jitted with static shapes, on
batches of (padded) images, so that WeakTr's CRF refinement of pseudo-labels runs on the accelerator
(and needs no compiled extension).

The model is pydensecrf's `DenseCRF2D` with `addPairwiseGaussian(sxy, compat)`,
`addPairwiseBilateral(sxy, srgb, rgbim, compat)` (Potts compatibility, NORMALIZE_SYMMETRIC) and
`inference(iterations)`:

    Q_0 = softmax(-U),   Q_t+1 = softmax(-U + sum_k w_k s_k * (K_k (s_k * Q_t))),   s_k = 1 / sqrt(K_k 1)

over the labels at every pixel, with the unary energies U (-log p; `unary_from_labels` is pydensecrf's
`unary_from_labels(..., zero_unsure=False)`), the compat weights w_k, and the kernels

    Gaussian    K(i, j) = exp(-|p_i - p_j|^2 / (2 sxy^2))
    bilateral   K(i, j) = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))

of the pixel positions p = (x, y) and RGB values I (0..255), the pixel itself included (K(i, i) = 1).
The symmetric normalisation s_k cancels the kernels' overall scale.

Approximation: the same as pydensecrf's, not a new one. The kernel sums K x are computed by a port of
its permutohedral lattice (Adams, Baek & Davis 2010; `permutohedral.cpp`): the features (p / sxy, and
I / srgb for the bilateral term) are elevated onto the d-dimensional lattice (d = 2 and 5), each pixel is
splatted with its barycentric weights onto the d + 1 vertices of its simplex, the vertex values are
blurred with [1/2, 1, 1/2] along each of the d + 1 lattice axes in turn, and sliced back with the same
weights times pydensecrf's alpha = 1 / (1 + 2^-d). Elevation, rounding (to nearest, ties to even, as its
SSE build), ranks, barycentric weights and blur order follow the C++ code, so the marginals match
pydensecrf's to float rounding (measured: benchmarks/crf_cpu.md). A local window (ConvCRF) was tried
and rejected: WeakTr's bilateral sxy of 50-83 px reaches far past any affordable window, and truncating
it changed the labels of most pixels that pydensecrf's CRF changes.

Static shapes: the lattice has at most S = N (d + 1) vertices for N pixels, so every vertex array has S
rows and the hash table 2^k >= 2 S slots (open addressing with linear probing, run in rounds over all
keys at once: the entries of one key move in lockstep, so each key gets exactly one slot). The
neighbour search and the blur run in chunks of S / 16 rows up to the vertices actually present (a few %
of S on natural images); splat and slice touch the N (d + 1) simplex corners. Padding (`valid`) moves
the padded pixels' features far from every image feature, onto lattice vertices of their own, so a
padded image gets the result of the unpadded one. A batch runs image after image (`jax.lax.map`):
vmapped, the per-image loops ran in lockstep with their slices turned into gathers, 2-4x slower on CPU,
and one image's arrays (S rows) are large already.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.wsss.crf import CrfParams, check_image, label_indices

# Vertex chunks per lattice: the neighbour search and the blur stop after the chunk with the last vertex.
_CHUNKS = 16


class _Lattice(NamedTuple):
    offsets: jax.Array     # (N, d + 1) vertex of each corner of each pixel's simplex
    weights: jax.Array     # (N, d + 1) barycentric weights of the corners
    neighbours: jax.Array  # (d + 1, 2, V) vertex before / after along each axis; V (out of range): none
    count: jax.Array       # () vertices present, the first `count` of the V >= S rows


def _hash(keys: jax.Array, table_size: int) -> jax.Array:
    # Any mixing of the coordinates does: a collision costs a probing round, not correctness.
    h = jnp.zeros(keys.shape[:-1], jnp.uint32)
    for k in range(keys.shape[-1]):
        h = (h ^ keys[..., k].astype(jnp.uint32)) * jnp.uint32(0x9E3779B1)
        h = h ^ (h >> 15)
    return (h & jnp.uint32(table_size - 1)).astype(jnp.int32)


def _probe(table: jax.Array, table_keys: jax.Array, queries: jax.Array, active: jax.Array,
           insert: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(table, slot of each query's key or -1) by linear probing, one slot per round for every query.
    `table` holds row indices of `table_keys`, whose last row (a key no query has) marks an empty slot.
    With `insert` (each query's row), a query at an empty slot claims it (the smallest row wins) and
    then finds its key there."""
    size, empty = table.shape[0], table_keys.shape[0] - 1

    def body(state):
        table, slot, found, pending = state
        owner = table[slot]
        if insert is not None:
            table = table.at[jnp.where(pending & (owner == empty), slot, size)].min(insert, mode="drop")
            owner = table[slot]
        hit = pending & (owner != empty) & (table_keys[owner] == queries).all(-1)
        found = jnp.where(hit, slot, found)
        pending = pending & ~hit & (owner != empty)
        return table, jnp.where(pending, (slot + 1) & (size - 1), slot), found, pending

    start = (table, _hash(queries, size), jnp.full(queries.shape[:-1], -1, jnp.int32), active)
    table, _, found, _ = jax.lax.while_loop(lambda state: state[3].any(), body, start)
    return table, found


def _simplices(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(keys (N, d + 1, d) int32 of the vertices of each point's simplex, barycentric weights (N, d + 1))
    of (N, d) features, as `Permutohedral::init`."""
    n, d = features.shape
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = np.asarray([inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)], np.float32)
    scaled = features * scale
    # elevated_0 = sum of all, elevated_j = sum_{i >= j} scaled_i - j scaled_{j-1}
    tail = jnp.concatenate([jnp.cumsum(scaled[:, ::-1], axis=1)[:, ::-1], jnp.zeros((n, 1), scaled.dtype)], 1)
    elevated = tail - jnp.arange(d + 1, dtype=scaled.dtype) * jnp.concatenate(
        [jnp.zeros((n, 1), scaled.dtype), scaled], 1)
    down = np.float32(1.0 / (d + 1))
    nearest = jnp.round(elevated * down)
    rem0 = (nearest * (d + 1)).astype(jnp.int32)
    residual = elevated - rem0
    # rank_i = #{j > i: r_i < r_j} + #{j < i: r_i <= r_j}: the C++'s comparisons, ties included.
    less = residual[:, :, None] < residual[:, None, :]
    upper = np.triu(np.ones((d + 1, d + 1), bool), 1)
    rank = (less & upper).sum(2) + (~less & upper).sum(1) + nearest.sum(1).astype(jnp.int32)[:, None]
    wrap = (rank < 0).astype(jnp.int32) - (rank > d).astype(jnp.int32)
    rank, rem0 = rank + (d + 1) * wrap, rem0 + (d + 1) * wrap
    part = ((elevated - rem0) * down)[..., None]
    corner = d - rank
    barycentric = (jax.nn.one_hot(corner, d + 2) * part - jax.nn.one_hot(corner + 1, d + 2) * part).sum(1)
    weights = barycentric[:, :d + 1].at[:, 0].add(1 + barycentric[:, d + 1])
    remainder = jnp.arange(d + 1)[None, :, None]
    keys = rem0[:, None, :d] + remainder - (d + 1) * (rank[:, None, :d] > d - remainder)
    return keys, weights


def _lattice(features: jax.Array) -> _Lattice:
    n, d = features.shape
    keys, weights = _simplices(features)
    s = n * (d + 1)
    entries = jnp.concatenate([keys.reshape(s, d), jnp.full((1, d), jnp.iinfo(jnp.int32).max, jnp.int32)])
    table_size = 1 << (2 * s - 1).bit_length()
    table, slot = _probe(jnp.full((table_size,), s, jnp.int32), entries, entries[:s], jnp.ones(s, bool),
                         insert=jnp.arange(s, dtype=jnp.int32))
    vertex_of_slot = jnp.cumsum(table != s, dtype=jnp.int32) - 1
    count = vertex_of_slot[-1] + 1
    offsets = vertex_of_slot[slot]
    chunk = -(-s // _CHUNKS)
    capacity = chunk * _CHUNKS
    vertex_keys = jnp.zeros((capacity, d), jnp.int32).at[offsets].set(entries[:s])
    # Along axis j a vertex's neighbours differ by -1 in every coordinate but j, by +d in j (for the
    # last axis, -1 everywhere), and by the opposite; rows (axis, before / after).
    step = np.full((d + 1, d), -1, np.int32)
    step[np.arange(d), np.arange(d)] = d
    steps = np.stack([step, -step], 1).reshape(2 * (d + 1), d)

    def search(state):
        start, neighbours = state
        rows = jax.lax.dynamic_slice_in_dim(vertex_keys, start, chunk)
        active = jnp.broadcast_to((start + jnp.arange(chunk) < count)[:, None], (chunk, 2 * (d + 1)))
        _, found = _probe(table, entries, rows[:, None, :] + steps, active)
        found = jnp.where(found >= 0, vertex_of_slot[found], capacity).T
        return start + chunk, jax.lax.dynamic_update_slice_in_dim(neighbours, found, start, axis=1)

    _, neighbours = jax.lax.while_loop(lambda state: state[0] < count, search,
                                       (0, jnp.full((2 * (d + 1), capacity), capacity, jnp.int32)))
    return _Lattice(offsets.reshape(n, d + 1), weights, neighbours.reshape(d + 1, 2, -1), count)


def _filter(lattice: _Lattice, values: jax.Array) -> jax.Array:
    """(N, C) -> (N, C): the lattice's approximation of sum_j K(i, j) values_j (`Permutohedral::compute`)."""
    n, corners = lattice.offsets.shape
    capacity = lattice.neighbours.shape[-1]
    chunk = capacity // _CHUNKS
    vertices = jnp.zeros((capacity, values.shape[1]), values.dtype).at[lattice.offsets.reshape(-1)].add(
        (lattice.weights[..., None] * values[:, None, :]).reshape(n * corners, -1))

    def blur(vertices, neighbours):
        def rows(state):
            start, blurred = state
            before, after = (vertices.at[i].get(mode="fill", fill_value=0)
                             for i in jax.lax.dynamic_slice_in_dim(neighbours, start, chunk, axis=1))
            new = jax.lax.dynamic_slice_in_dim(vertices, start, chunk) + 0.5 * (before + after)
            return start + chunk, jax.lax.dynamic_update_slice_in_dim(blurred, new, start, 0)

        return jax.lax.while_loop(lambda state: state[0] < lattice.count, rows, (0, vertices))[1], None

    # One compiled body for the d + 1 axes.
    vertices, _ = jax.lax.scan(blur, vertices, lattice.neighbours)
    alpha = 1.0 / (1.0 + 2.0 ** -(corners - 1))
    return (vertices[lattice.offsets] * lattice.weights[..., None]).sum(1) * alpha


def _check_params(params: CrfParams) -> None:
    for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        if not getattr(params, name) > 0:
            raise UserError(f"CRF {name} must be > 0, got {getattr(params, name)}")
    if not (isinstance(params.iterations, int) and params.iterations >= 0):
        raise UserError(f"CRF iterations must be an integer >= 0, got {params.iterations!r}")


def unary_from_labels(labels: jax.Array, num_labels, gt_prob: float = 0.7, size: int | None = None) -> jax.Array:
    """pydensecrf's `unary_from_labels(labels, n, gt_prob, zero_unsure=False)`, batched: energies
    (..., size, H, W) of (..., H, W) label maps in [0, num_labels): -log(gt_prob) for the pixel's label,
    -log((1 - gt_prob) / (num_labels - 1)) for the others, +inf (never chosen) for labels from
    `num_labels` to `size`. `num_labels`: an int, or one per map ((...,) array) with `size` (static) their
    maximum or more; `size` defaults to `num_labels`."""
    if not 0 < gt_prob < 1:
        raise UserError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    if size is None:
        if not isinstance(num_labels, int):
            raise UserError("unary_from_labels needs `size` (the label axis length) when num_labels is an array")
        size = num_labels
    num_labels = jnp.asarray(num_labels)[..., None, None, None]
    label = jnp.arange(size)[:, None, None]
    other = -jnp.log((1 - gt_prob) / jnp.maximum(num_labels - 1, 1))
    energy = jnp.where(label == jnp.asarray(labels)[..., None, :, :], -math.log(gt_prob), other)
    return jnp.where(label < num_labels, energy, jnp.inf).astype(jnp.float32)


def unary_from_probabilities(probabilities: jax.Array, clip: float = 1e-5) -> jax.Array:
    """-log(max(p, clip)) of (..., L, H, W) class probabilities: WeakTr's stage-2 CRF unary."""
    return -jnp.log(jnp.maximum(jnp.asarray(probabilities, jnp.float32), clip))


def _features(image: jax.Array, valid: jax.Array, sxy: float, srgb: float | None) -> jax.Array:
    """(N, 2 or 5) features of one (H, W, 3) image; padded pixels all at one point far from the image's."""
    height, width = valid.shape
    rows, cols = jnp.mgrid[:height, :width].astype(jnp.float32)
    features = [cols / sxy, rows / sxy]
    if srgb is not None:
        features += [image[..., c].astype(jnp.float32) / srgb for c in range(3)]
    features = jnp.stack(features, -1).reshape(height * width, -1)
    # Far beyond the blur's reach (d + 1 lattice steps of about one feature unit) from any pixel.
    far = -(max(height, width, 256) / min(sxy, srgb or sxy) + 100.0 * (features.shape[1] + 1))
    return jnp.where(valid.reshape(-1, 1), features, far)


@functools.partial(jax.jit, static_argnames=("params",))
def dense_crf(image: jax.Array, unary: jax.Array, params: CrfParams, valid: jax.Array | None = None) -> jax.Array:
    """Mean-field marginals (B, L, H, W) of the dense CRF (module docstring) of (B, H, W, 3) RGB images
    (0..255, uint8 or float) and (B, L, H, W) unary energies (+inf: a label the image does not have).
    `valid` (B, H, W) bool marks the image pixels of padded inputs (default: all); the marginals of
    padded pixels are meaningless. The images are independent (one after the other)."""
    _check_params(params)
    batch, num_labels, height, width = unary.shape
    if image.shape != (batch, height, width, 3):
        raise UserError(f"dense_crf needs (B, H, W, 3) images of the unary's (B, L, H, W) = {unary.shape}, "
                        f"got {image.shape}")
    valid = jnp.ones((batch, height, width), bool) if valid is None else jnp.asarray(valid, bool)
    unary = jnp.where(valid[:, None], unary.astype(jnp.float32), 0.0)

    def one(image, unary, valid):
        terms = [(_lattice(_features(image, valid, params.gaussian_sxy, None)), params.gaussian_compat),
                 (_lattice(_features(image, valid, params.bilateral_sxy, params.bilateral_srgb)),
                  params.bilateral_compat)]
        ones = jnp.ones((height * width, 1), jnp.float32)
        norms = [jax.lax.rsqrt(_filter(lattice, ones) + 1e-20) for lattice, _ in terms]
        energy = -unary.reshape(num_labels, -1).T

        def step(_, q):
            message = sum(compat * norm * _filter(lattice, norm * q) for (lattice, compat), norm in zip(terms, norms))
            return jax.nn.softmax(energy + message, axis=-1)

        q = jax.lax.fori_loop(0, params.iterations, step, jax.nn.softmax(energy, axis=-1))
        return q.T.reshape(num_labels, height, width)

    return jax.lax.map(lambda args: one(*args), (jnp.asarray(image), unary, valid))


# The canvas of `crf_from_labels`' batches grows in steps of this many pixels, so that images of many
# sizes share a few compiled programs.
CANVAS_STEP = 32


@functools.partial(jax.jit, static_argnames=("params", "gt_prob", "size"))
def _label_crf(images, indices, counts, valid, params: CrfParams, gt_prob: float, size: int) -> jax.Array:
    unary = unary_from_labels(indices, counts, gt_prob, size)
    return jnp.argmax(dense_crf(images, unary, params, valid), axis=1).astype(jnp.int32)


def crf_from_labels(images, label_maps, params: CrfParams, gt_prob: float = 0.7, labels=None,
                    batch_size: int | None = None) -> list[np.ndarray]:
    """`jaxseg.wsss.crf.crf_from_labels` in JAX for a batch: uint8 (H, W, 3) images and (H, W) label maps
    of any sizes, each refined over its `labels` (`jaxseg.wsss.crf.label_indices`; default: the ids in
    its map). One `dense_crf` call, on a canvas padded to multiples of `CANVAS_STEP`, the label axis
    padded to a power of two and the batch to `batch_size` (default: the number of images)."""
    count = len(images)
    batch_size = batch_size or count
    if not 1 <= count <= batch_size or len(label_maps) != count:
        raise UserError(f"crf_from_labels takes 1 to batch_size={batch_size} images with one label map each, got "
                        f"{count} images and {len(label_maps)} maps")
    labels = [None] * count if labels is None else labels
    compact = []
    for image, label_map, ids in zip(images, label_maps, labels):
        check_image(np.asarray(image), np.shape(label_map))
        compact.append(label_indices(label_map, ids))
    height, width = (-(-max(np.shape(m)[axis] for m in label_maps) // CANVAS_STEP) * CANVAS_STEP for axis in (0, 1))
    size = max(2, 1 << (max(len(ids) for ids, _ in compact) - 1).bit_length())
    canvas = np.zeros((batch_size, height, width, 3), np.uint8)
    indices = np.zeros((batch_size, height, width), np.int32)
    valid = np.zeros((batch_size, height, width), bool)
    counts = np.ones(batch_size, np.int32)
    for i, (image, (ids, index)) in enumerate(zip(images, compact)):
        h, w = index.shape
        canvas[i, :h, :w], indices[i, :h, :w], valid[i, :h, :w], counts[i] = image, index, True, len(ids)
    best = np.asarray(_label_crf(canvas, indices, counts, valid, params, float(gt_prob), size))
    return [ids[best[i, :index.shape[0], :index.shape[1]]] for i, (ids, index) in enumerate(compact)]
