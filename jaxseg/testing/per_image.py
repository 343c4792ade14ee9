"""Per-image reference forms of the evaluation schemes: one image at its own size, one compiled program per
size. The library evaluates with their batched forms over static canvases (`jaxseg.inference.canvas`),
which are tested against these; the benchmarks time these as the per-image loop.

  sliding_window_scores / segment   EoMT's semantic sliding windows;
  padded_square_logits              EoMT's whole-image resize-pad (panoptic, instance);
  multiscale_flip_probs             Segmenter's multi-scale + flip windows (WeakTr stage 2).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxseg.inference.semantic import ScoreFn, strided_anchors, window_starts
from jaxseg.ops.resize import resize

Array = jax.Array


def _score_windows(score_fn: ScoreFn, image: Array, anchors: list[tuple[int, int]], crop: int) -> Array:
    """Scores (..., K, h, w) of an (h, w, 3) image from square windows at `anchors` (top, left): each
    window scored once, overlaps averaged. `score_fn` may return extra leading axes per window."""
    windows = jnp.stack([image[top:top + crop, left:left + crop] for top, left in anchors])
    scores = score_fn(windows)
    total = jnp.zeros(scores.shape[1:-2] + image.shape[:2], jnp.float32)
    count = jnp.zeros(image.shape[:2], jnp.float32)
    for (top, left), window_scores in zip(anchors, scores):
        total = total.at[..., top:top + crop, left:left + crop].add(window_scores)
        count = count.at[top:top + crop, left:left + crop].add(1.0)
    return total / count

def sliding_window_scores(score_fn: ScoreFn, image: Array, crop: int) -> Array:
    """(K, H, W) class scores of one (H, W, 3) image at its original size (EoMT's scheme)."""
    height, width = image.shape[:2]
    scale = max(crop / height, crop / width)
    size = (round(height * scale), round(width * scale))
    # PIL-style bilinear (antialiased when shrinking), as the reference resizes with PIL.
    resized = resize(image.astype(jnp.float32), size, method="bilinear", antialias=True, axes=(0, 1))
    starts = window_starts(max(size), crop)
    anchors = [(s, 0) for s in starts] if size[0] > size[1] else [(0, s) for s in starts]
    scores = _score_windows(score_fn, resized, anchors, crop)
    return resize(scores, (height, width), method="bilinear", axes=(-2, -1))

def multiscale_flip_probs(score_fn: ScoreFn, image: Array, ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), *,
                          base_short_side: int = 520, window: int = 480, stride: int = 320) -> Array:
    """Segmenter / WeakTr stage-2 evaluation of one (H, W, 3) image: for every ratio (short side =
    ratio * base, then at least `window`) and both flips, square windows every `stride` pixels (the last
    aligned to the end), overlapping logits averaged, upsampled to (H, W), un-flipped and soft-maxed over
    classes; the probabilities are averaged over all passes. `score_fn` returns logits
    (n, ..., K, window, window); the result is (..., K, H, W)."""
    height, width = image.shape[:2]
    image = jnp.asarray(image, jnp.float32)
    total = None
    for ratio in ratios:
        short = ratio * base_short_side
        size = (round(short * height / min(height, width)), round(short * width / min(height, width)))
        scaled = resize(image, size, method="bilinear", antialias=True, axes=(0, 1))
        if min(size) < window:  # Segmenter's `resize`: plain bilinear up to the window size
            if size[0] < size[1]:
                size = (window, int(size[1] / size[0] * window))
            else:
                size = (int(size[0] / size[1] * window), window)
            scaled = resize(scaled, size, method="bilinear", axes=(0, 1))
        anchors = [(top, left) for top in strided_anchors(size[0], window, stride)
                   for left in strided_anchors(size[1], window, stride)]
        for flip in (False, True):
            view = scaled[:, ::-1] if flip else scaled
            logits = resize(_score_windows(score_fn, view, anchors, window), (height, width),
                            method="bilinear", axes=(-2, -1))
            probs = jax.nn.softmax(logits[..., ::-1] if flip else logits, axis=-3)
            total = probs if total is None else total + probs
    return total / (2 * len(ratios))

def segment(score_fn: ScoreFn, image: Array, crop: int) -> Array:
    """(H, W) int32 class map of one image."""
    return jnp.argmax(sliding_window_scores(score_fn, image, crop), axis=0).astype(jnp.int32)

def padded_square_logits(predict: Callable[[Array], tuple[Array, Array]], image: Array, crop: int
                         ) -> tuple[Array, Array]:
    """(class logits (Q, K+1), mask logits (Q, H, W)) of one (H, W, 3) image; `predict` maps
    (1, crop, crop, 3) images to class logits (1, Q, K+1) and mask logits (1, Q, h, w)."""
    height, width = image.shape[:2]
    scale = min(crop / height, crop / width)
    size = (round(height * scale), round(width * scale))
    # PIL-style bilinear (antialiased when shrinking), as the reference resizes with PIL.
    resized = resize(jnp.asarray(image, jnp.float32), size, method="bilinear", antialias=True, axes=(0, 1))
    padded = jnp.zeros((crop, crop, 3), jnp.float32).at[:size[0], :size[1]].set(resized)
    class_logits, mask_logits = predict(padded[None])
    masks = resize(mask_logits[0].astype(jnp.float32), (crop, crop), method="bilinear", axes=(-2, -1))
    masks = resize(masks[:, :size[0], :size[1]], (height, width), method="bilinear", axes=(-2, -1))
    return class_logits[0], masks
