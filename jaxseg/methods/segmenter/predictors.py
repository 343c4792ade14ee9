"""Segmenter's evaluation (WeakTr stage 2): sliding crop-sized windows (stride 2/3 of the crop) over the
image at each of `scales` x `base_size` short side, plain and flipped, the read-out combination
`readout_weights` of the decoder's blocks, probabilities averaged over the passes (`jaxseg.inference.canvas`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.inference.canvas import multiscale_flip_inputs, multiscale_flip_probs
from jaxseg.models.segmenter import combine_readouts
from jaxseg.ops.image import PIXEL_STATS, normalize
from jaxseg.wsss.cam import wsss_semantic


class MultiScaleFlipPredictor:
    """`canvas`: the largest (H, W) an image may have (default: a crop); `max_aspect`: the longest side an
    image may have relative to its shortest (sizes the scaled plane the windows run over)."""
    fixed_shape = True

    def __init__(self, method, scales: Sequence[float] = (1.0,), readout_weights: Sequence[float] = (0.8, 1.0),
                 canvas: tuple[int, int] | None = None, max_aspect: float = 2.0):
        self.method, self.scales, self.readout_weights = method, tuple(scales), tuple(readout_weights)
        self.window, self.base = method.crop_size, method.base_size
        self.stride = self.window * 2 // 3
        self._canvas = tuple(canvas) if canvas else (self.window, self.window)
        short = max(max(self.scales) * self.base, self.window)
        side = math.ceil(short * max_aspect) + 1
        self.plane = (side, side)

    def canvas(self, example: dict) -> tuple[int, int]:
        return self._canvas

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        return multiscale_flip_inputs(np.asarray(example["image"]), self.scales, base=self.base, window=self.window,
                                      stride=self.stride, canvas=self._canvas, max_scaled=self.plane)

    def targets(self, example: dict) -> dict:
        return {"semantic": wsss_semantic(example, self.method.num_foreground, self.method.data.ground_truth)}

    def _log_scores(self, params: Any, windows: jax.Array) -> jax.Array:
        """(n, N, h, w) log of the read-out combination: the passes soft-max what they get, and
        softmax(log s) = s / sum(s), so they average the combined score (normalised by the weights' sum)."""
        scores = combine_readouts(self.method.network.apply({"params": params}, windows), self.readout_weights)
        return jnp.moveaxis(jnp.log(scores), -1, 1)

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        probs = multiscale_flip_probs(lambda windows: self._log_scores(params, windows), batch, self.window,
                                      lambda image: normalize(image / 255, *PIXEL_STATS[self.method.pixel_stats]))
        return {"semantic": jnp.argmax(probs, axis=1).astype(jnp.int32)}

    def finish(self, outputs: dict, example: dict) -> dict:
        height, width = np.asarray(example["image"]).shape[:2]
        return {"semantic": outputs["semantic"][:height, :width]}
