"""Window positions of the sliding-window schemes and the score function of a mask-classification model.

EoMT's evaluation resizes the image so that its shorter side equals the crop size and cuts
n = ceil(long / crop) square windows along the longer side with the overlap spread evenly; Segmenter's
cuts windows every `stride` pixels on both axes, the last aligned to the end. The overlapping scores are
averaged and resized back to the image (`jaxseg.inference.canvas`).
"""
from __future__ import annotations

from collections.abc import Callable

import jax

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


def strided_anchors(length: int, window: int, stride: int) -> list[int]:
    """Segmenter's window starts: every `stride` pixels while a full window fits, plus one window aligned
    to the end."""
    return [a for a in range(0, length, stride) if a < length - window] + [length - window]


def mask_classification_score_fn(predict: Callable[[Array], tuple[Array, Array]]) -> ScoreFn:
    """Score function of a mask-classification model: `predict(windows)` returns class logits
    (n, Q, K+1) and mask logits (n, Q, h, w); masks are upsampled (bilinear, no antialias) to the window
    and combined as sum_q sigmoid(mask_q) * softmax(class_q)."""
    def score_fn(windows):
        class_logits, mask_logits = predict(windows)
        mask_logits = resize(mask_logits, windows.shape[1:3], method="bilinear", axes=(-2, -1))
        return jax.vmap(semantic_scores)(class_logits, mask_logits)
    return score_fn
