"""Semantic segmentation of images of any size with a model that runs on fixed square crops.

EoMT's evaluation (and the sliding part of WeakTr's): resize the image so that its shorter side equals
the crop size, cut n = ceil(long / crop) square windows along the longer side with the overlap spread
evenly, score each window, average the overlapping scores, resize the scores to the original size and
take the argmax. The model only ever sees (crop, crop) inputs, so it compiles once.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxseg.inference.mask_classification import semantic_scores
from jaxseg.ops.resize import resize

Array = jax.Array
# (n, crop, crop, 3) windows -> (n, K, crop, crop) class scores.
ScoreFn = Callable[[Array], Array]


def window_starts(length: int, crop: int) -> list[int]:
    """Starts of the windows along one side: n = ceil(length / crop) windows of size `crop`, their
    overlap spread evenly (EoMT's `window_imgs_semantic`)."""
    if length <= crop:
        return [0]
    num = -(-length // crop)
    overlap = num * crop - length
    return [int(k * (crop - overlap / (num - 1))) for k in range(num)]


def sliding_window_scores(score_fn: ScoreFn, image: Array, crop: int) -> Array:
    """(K, H, W) class scores of one (H, W, 3) image at its original size."""
    height, width = image.shape[:2]
    scale = max(crop / height, crop / width)
    size = (round(height * scale), round(width * scale))
    # PIL-style bilinear (antialiased when shrinking), as the reference resizes with PIL.
    resized = resize(image.astype(jnp.float32), size, method="bilinear", antialias=True, axes=(0, 1))
    vertical = size[0] > size[1]
    starts = window_starts(max(size), crop)
    windows = jnp.stack([resized[s:s + crop] if vertical else resized[:, s:s + crop] for s in starts])
    scores = score_fn(windows)
    total = jnp.zeros((scores.shape[1], *size), jnp.float32)
    count = jnp.zeros(size, jnp.float32)
    for s, window_scores in zip(starts, scores):
        region = (slice(None), slice(s, s + crop), slice(None)) if vertical else \
            (slice(None), slice(None), slice(s, s + crop))
        total = total.at[region].add(window_scores)
        count = count.at[region[1:]].add(1.0)
    return resize(total / count, (height, width), method="bilinear", axes=(1, 2))


def mask_classification_score_fn(predict: Callable[[Array], tuple[Array, Array]]) -> ScoreFn:
    """Score function of a mask-classification model: `predict(windows)` returns class logits
    (n, Q, K+1) and mask logits (n, Q, h, w); masks are upsampled (bilinear, no antialias) to the window
    and combined as sum_q sigmoid(mask_q) * softmax(class_q)."""
    def score_fn(windows):
        class_logits, mask_logits = predict(windows)
        mask_logits = resize(mask_logits, windows.shape[1:3], method="bilinear", axes=(-2, -1))
        return jax.vmap(semantic_scores)(class_logits, mask_logits)
    return score_fn


def segment(score_fn: ScoreFn, image: Array, crop: int) -> Array:
    """(H, W) int32 class map of one image."""
    return jnp.argmax(sliding_window_scores(score_fn, image, crop), axis=0).astype(jnp.int32)
