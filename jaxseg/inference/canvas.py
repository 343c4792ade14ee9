"""Images of any size inside static shapes: the batched forms of the evaluation schemes of
`jaxseg.inference.semantic` and `jaxseg.inference.whole_image`.

Each image is padded into a fixed canvas, and every resize it needs (to the model's input, back to the
image size) is an interpolation matrix built on the host for that image's sizes and zero-padded to the
canvas (`jaxseg.ops.resize.padded_matrix`). Inside jit the matrices are applied as the plain resizes are,
so a batch of images of different sizes runs through one compiled program and gives the numbers of the
per-image schemes (up to float32 summation order); outputs are canvas-sized, zero (or void) beyond each
image. Window positions that depend on the image size are inputs too, with a fixed number of windows
(unused ones weighted 0).

`*_inputs` run on the host for one image and return numpy arrays; the other functions run inside jit on a
batch of them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.inference.semantic import strided_anchors, window_starts
from jaxseg.ops.resize import apply_matrix, padded_matrix, resize

Array = jax.Array
# (n, window, window, 3) images -> (n, K, window, window) scores or logits.
ScoreFn = Callable[[Array], Array]


def image_canvas(image: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """A uint8 (H, W, 3) image in the top-left corner of a zero canvas."""
    image = np.asarray(image)
    if image.shape[0] > canvas[0] or image.shape[1] > canvas[1]:
        raise UserError(f"a {image.shape[0]}x{image.shape[1]} image does not fit the {canvas[0]}x{canvas[1]} "
                        "prediction canvas (set the predictor's canvas to the largest image size)")
    out = np.zeros(tuple(canvas) + image.shape[2:], image.dtype)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def valid_pixels(size: Array, canvas: tuple[int, int]) -> Array:
    """(H, W) bool of a canvas: True inside the image of `size` (2,) at the top left."""
    rows = jnp.arange(canvas[0])[:, None] < size[0]
    cols = jnp.arange(canvas[1])[None, :] < size[1]
    return rows & cols


def _resize2d(x: Array, rows: Array, cols: Array, axes: tuple[int, int]) -> Array:
    return apply_matrix(apply_matrix(x, rows, axes[0]), cols, axes[1])


# --- EoMT's whole-image scheme (panoptic, instance): resize the longer side to the crop, pad, forward
# once, bring the mask logits back to the image size.

def resize_pad_inputs(image: np.ndarray, crop: int, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
    height, width = image.shape[:2]
    scale = min(crop / height, crop / width)
    size = (round(height * scale), round(width * scale))
    return {"image": image_canvas(image, canvas), "size": np.asarray([height, width], np.int32),
            "rows_in": padded_matrix(height, size[0], canvas[0], crop, antialias=True),
            "cols_in": padded_matrix(width, size[1], canvas[1], crop, antialias=True),
            "rows_out": padded_matrix(size[0], height, crop, canvas[0]),
            "cols_out": padded_matrix(size[1], width, crop, canvas[1])}


def resize_pad_logits(predict: Callable[[Array], tuple[Array, Array]], inputs: dict[str, Array], crop: int,
                      preprocess: Callable[[Array], Array]) -> tuple[Array, Array]:
    """(class logits (B, Q, K+1), mask logits (B, Q, H, W) at the canvas, -inf beyond each image) of a
    batch of `resize_pad_inputs`; `predict` maps (B, crop, crop, 3) images in [0, 1] to class logits and
    mask logits (B, Q, h, w); `preprocess` maps the float image canvas to the model's pixel scale."""
    images = preprocess(inputs["image"].astype(jnp.float32))
    padded = jax.vmap(_resize2d, in_axes=(0, 0, 0, None))(images, inputs["rows_in"], inputs["cols_in"], (0, 1))
    class_logits, mask_logits = predict(padded)
    masks = resize(mask_logits.astype(jnp.float32), (crop, crop), method="bilinear", axes=(-2, -1))
    masks = jax.vmap(_resize2d, in_axes=(0, 0, 0, None))(masks, inputs["rows_out"], inputs["cols_out"], (-2, -1))
    canvas = inputs["image"].shape[1:3]
    valid = jax.vmap(valid_pixels, in_axes=(0, None))(inputs["size"], canvas)
    return class_logits, jnp.where(valid[:, None], masks, -jnp.inf)


# --- EoMT's sliding windows (semantic): the shorter side resized to the crop, square windows along the
# longer side with their overlap spread evenly, overlaps averaged, scores back at the image size. Tall
# images are transposed on the host (and their output inside jit), so windows always run along the width.

def sliding_inputs(image: np.ndarray, crop: int, canvas: int, max_windows: int) -> dict[str, np.ndarray]:
    """Inputs of one image for a square `canvas`; `max_windows` bounds the windows (the longer side may be
    at most max_windows crops once the shorter side is one crop)."""
    tall = image.shape[0] > image.shape[1]
    image = np.swapaxes(image, 0, 1) if tall else image
    short, long = image.shape[:2]
    scale = max(crop / short, crop / long)
    size = (round(short * scale), round(long * scale))
    starts = window_starts(size[1], crop)
    if len(starts) > max_windows:
        raise UserError(f"a {short}x{long} image needs {len(starts)} windows of {crop} px, more than the "
                        f"predictor's max_windows={max_windows}")
    length = crop * max_windows
    return {"image": image_canvas(image, (canvas, canvas)), "tall": np.bool_(tall),
            "rows_in": padded_matrix(short, size[0], canvas, crop, antialias=True),
            "cols_in": padded_matrix(long, size[1], canvas, length, antialias=True),
            "rows_out": padded_matrix(size[0], short, crop, canvas),
            "cols_out": padded_matrix(size[1], long, length, canvas),
            "starts": np.asarray(starts + [0] * (max_windows - len(starts)), np.int32),
            "used": np.arange(max_windows) < len(starts)}


def _accumulate(window_scores: Array, tops: Array, lefts: Array, used: Array, shape: tuple[int, int]) -> Array:
    """(..., K, h, w) window scores placed at (tops, lefts) of a (K, *shape) plane, overlaps averaged over
    the used windows (0 where no window reaches)."""
    size = window_scores.shape[-2:]

    def place(scores, top, left, weight):
        plane = jnp.zeros(scores.shape[:-2] + shape, jnp.float32)
        ones = jnp.zeros(shape, jnp.float32)
        start = (0,) * (scores.ndim - 2)
        plane = jax.lax.dynamic_update_slice(plane, scores * weight, start + (top, left))
        ones = jax.lax.dynamic_update_slice(ones, jnp.full(size, weight, jnp.float32), (top, left))
        return plane, ones

    planes, counts = jax.vmap(place)(window_scores, tops, lefts, used.astype(jnp.float32))
    count = counts.sum(0)
    return planes.sum(0) / jnp.maximum(count, 1.0)


def sliding_scores(score_fn: ScoreFn, inputs: dict[str, Array], crop: int,
                   preprocess: Callable[[Array], Array]) -> Array:
    """(B, K, S, S) class scores of a batch of `sliding_inputs` at their canvas (0 beyond each image)."""
    images = preprocess(inputs["image"].astype(jnp.float32))
    resized = jax.vmap(_resize2d, in_axes=(0, 0, 0, None))(images, inputs["rows_in"], inputs["cols_in"], (0, 1))
    batch, num_windows = inputs["starts"].shape
    windows = jax.vmap(jax.vmap(lambda image, start: jax.lax.dynamic_slice(
        image, (0, start, 0), (crop, crop, 3)), in_axes=(None, 0)))(resized, inputs["starts"])
    # The model sees each window the right way up: tall images' windows are transposed back, and so are
    # their scores.
    tall = inputs["tall"][:, None, None, None, None]
    windows = jnp.where(tall, jnp.swapaxes(windows, 2, 3), windows)
    scores = score_fn(windows.reshape((batch * num_windows, crop, crop, 3)))
    scores = scores.reshape((batch, num_windows) + scores.shape[1:])
    scores = jnp.where(tall, jnp.swapaxes(scores, -1, -2), scores)
    plane_shape = resized.shape[1:3]
    tops = jnp.zeros_like(inputs["starts"])
    averaged = jax.vmap(_accumulate, in_axes=(0, 0, 0, 0, None))(scores, tops, inputs["starts"], inputs["used"],
                                                                plane_shape)
    out = jax.vmap(_resize2d, in_axes=(0, 0, 0, None))(averaged, inputs["rows_out"], inputs["cols_out"], (-2, -1))
    return jnp.where(inputs["tall"][:, None, None, None], jnp.swapaxes(out, -1, -2), out)


# --- Segmenter's multi-scale + flip windows (WeakTr stage 2): per ratio the shorter side becomes
# ratio * base (at least the window), square windows every `stride` pixels on both axes (the last aligned
# to the end), overlapping logits averaged and brought back to the image size, un-flipped, soft-maxed; the
# probabilities averaged over all passes. The flip is part of the resize matrices.

def _scaled_size(height: int, width: int, ratio: float, base: int, window: int) -> tuple[tuple[int, int], tuple]:
    """(size after the ratio resize, size after Segmenter's upscale to the window or None)."""
    short = ratio * base
    size = (round(short * height / min(height, width)), round(short * width / min(height, width)))
    if min(size) >= window:
        return size, None
    if size[0] < size[1]:
        return size, (window, int(size[1] / size[0] * window))
    return size, (int(size[0] / size[1] * window), window)


def multiscale_flip_inputs(image: np.ndarray, ratios: Sequence[float], *, base: int, window: int, stride: int,
                           canvas: tuple[int, int], max_scaled: tuple[int, int]) -> dict[str, np.ndarray]:
    """Inputs of one image: per ratio and flip the resize matrices into a `max_scaled` plane (the largest
    scaled size any image may reach at the largest ratio) and the window grid, padded to the most windows
    that plane can hold."""
    height, width = image.shape[:2]
    max_rows = len(strided_anchors(max_scaled[0], window, stride))
    max_cols = len(strided_anchors(max_scaled[1], window, stride))
    per_view: dict[str, list] = {key: [] for key in ("rows_in", "cols_in", "rows_out", "cols_out", "tops", "lefts",
                                                     "used")}
    for ratio in ratios:
        size, upscaled = _scaled_size(height, width, ratio, base, window)
        final = upscaled or size
        if final[0] > max_scaled[0] or final[1] > max_scaled[1]:
            raise UserError(f"a {height}x{width} image scales to {final[0]}x{final[1]} at ratio {ratio}, more "
                            f"than the predictor's plane {max_scaled[0]}x{max_scaled[1]}")
        rows = padded_matrix(height, size[0], canvas[0], max_scaled[0], antialias=True).astype(np.float64)
        if upscaled:
            rows = padded_matrix(size[0], final[0], max_scaled[0], max_scaled[0]) @ rows
        anchors = [(top, left) for top in strided_anchors(final[0], window, stride)
                   for left in strided_anchors(final[1], window, stride)]
        count = max_rows * max_cols
        tops = np.zeros(count, np.int32)
        lefts = np.zeros(count, np.int32)
        tops[:len(anchors)] = [a[0] for a in anchors]
        lefts[:len(anchors)] = [a[1] for a in anchors]
        for flip in (False, True):
            cols = padded_matrix(width, size[1], canvas[1], max_scaled[1], antialias=True).astype(np.float64)
            if upscaled:
                cols = padded_matrix(size[1], final[1], max_scaled[1], max_scaled[1]) @ cols
            if flip:
                cols[:final[1]] = cols[:final[1]][::-1].copy()
            per_view["rows_in"].append(rows.astype(np.float32))
            per_view["cols_in"].append(cols.astype(np.float32))
            per_view["rows_out"].append(padded_matrix(final[0], height, max_scaled[0], canvas[0]))
            # Back to the image width, the flip undone inside the matrix.
            per_view["cols_out"].append(padded_matrix(final[1], width, max_scaled[1], canvas[1], flip=flip))
            per_view["tops"].append(tops)
            per_view["lefts"].append(lefts)
            per_view["used"].append(np.arange(count) < len(anchors))
    out = {key: np.stack(values) for key, values in per_view.items()}
    out["image"] = image_canvas(image, canvas)
    out["size"] = np.asarray([height, width], np.int32)
    return out


def multiscale_flip_probs(score_fn: ScoreFn, inputs: dict[str, Array], window: int,
                          preprocess: Callable[[Array], Array]) -> Array:
    """(B, K, H, W) probabilities at the canvas of a batch of `multiscale_flip_inputs` (0 beyond each
    image); `score_fn` gives logits."""
    images = preprocess(inputs["image"].astype(jnp.float32))
    batch, views, windows = inputs["tops"].shape
    plane = (inputs["rows_in"].shape[-2], inputs["cols_in"].shape[-2])

    def scaled(image, rows, cols):
        return _resize2d(image, rows, cols, (0, 1))

    planes = jax.vmap(jax.vmap(scaled, in_axes=(None, 0, 0)))(images, inputs["rows_in"], inputs["cols_in"])
    def crop(image, top, left):
        return jax.lax.dynamic_slice(image, (top, left, 0), (window, window, 3))

    crops = jax.vmap(jax.vmap(jax.vmap(crop, in_axes=(None, 0, 0))))(planes, inputs["tops"], inputs["lefts"])
    logits = score_fn(crops.reshape((batch * views * windows, window, window, 3)))
    logits = logits.reshape((batch, views, windows) + logits.shape[1:])
    averaged = jax.vmap(jax.vmap(_accumulate, in_axes=(0, 0, 0, 0, None)), in_axes=(0, 0, 0, 0, None))(
        logits, inputs["tops"], inputs["lefts"], inputs["used"], plane)
    canvas = inputs["image"].shape[1:3]
    back = jax.vmap(jax.vmap(_resize2d, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None))(
        averaged, inputs["rows_out"], inputs["cols_out"], (-2, -1))
    probs = jax.nn.softmax(back, axis=-3).mean(1)
    valid = jax.vmap(valid_pixels, in_axes=(0, None))(inputs["size"], canvas)
    return jnp.where(valid[:, None], probs, 0.0)


def fitted_settings(settings: dict, sizes: list[tuple[int, int]]) -> dict:
    """Predictor `settings` whose static bounds ("canvas", "max_windows", "max_aspect", where present) are
    raised to hold every image of `sizes` [(H, W)] (e.g. a user's folder of photos of any size)."""
    out = dict(settings)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    aspect = max(max(h, w) / min(h, w) for h, w in sizes)
    if "canvas" in out:
        canvas = out["canvas"] or (0, 0)
        out["canvas"] = (max(canvas[0], height), max(canvas[1], width))
    if "max_windows" in out:
        out["max_windows"] = max(out["max_windows"], math.ceil(aspect) + 1)
    if "max_aspect" in out:
        out["max_aspect"] = max(out["max_aspect"], aspect)
    return out
