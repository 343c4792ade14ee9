"""SETR's evaluation: mmseg's slide inference (crop-size windows, stride 2/3 of the crop, overlapping logits
averaged) through Segmenter's multi-scale + flip predictor (`MultiScaleFlipPredictor`: each of `scales` x
`base_size` short side, plain and flipped, probabilities averaged), reading SETR's logits and the
dataset's own labels."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.methods.segmenter.predictors import MultiScaleFlipPredictor


class SlidingPredictor(MultiScaleFlipPredictor):
    """`canvas`: the largest (H, W) an image may have (default: a crop); `max_aspect`: the longest side an
    image may have relative to its shortest. Unlike mmseg's single-scale test, every scale also runs
    flipped (the Segmenter predictor's passes)."""

    def __init__(self, method, scales: Sequence[float] = (1.0,), canvas: tuple[int, int] | None = None,
                 max_aspect: float = 2.0):
        super().__init__(method, scales, readout_weights=(1.0,), canvas=canvas, max_aspect=max_aspect)

    def targets(self, example: dict) -> dict:
        return {"semantic": np.asarray(example["semantic"])[..., 0]}

    def _log_scores(self, params: Any, windows: jax.Array) -> jax.Array:
        # Logits serve as log scores: the passes soft-max them.
        return jnp.moveaxis(self.method.network.apply(params, windows), -1, 1)
