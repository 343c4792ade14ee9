"""EoMT's predictors, as its evaluation does them (docs/eomt.md, "Inference and evaluation"), batched
through static canvases (`jaxseg.inference.canvas`):
  "panoptic"  the whole image resized to fit the crop and padded, one forward; panoptic segments
              (Mask2Former post-processing) and the semantic map of the same forward;
  "instance"  the same forward; the top (query, class) pairs as instances (COCO mask AP);
  "semantic"  sliding crop-sized windows along the longer side of the image resized to the crop.
The final prediction (masking off) of the model is used.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.inference.canvas import resize_pad_inputs, resize_pad_logits, sliding_inputs, sliding_scores, valid_pixels
from jaxseg.inference.mask_classification import instance_predictions, panoptic_segments, semantic_scores
from jaxseg.inference.semantic import mask_classification_score_fn

# Decoded segment tables of images without segments come back as float64: the stored dtypes.
_SEGMENT_DTYPES = {"id": np.int32, "category_id": np.int32, "is_thing": bool, "iscrowd": bool,
                   "area": np.int32, "bbox": np.int32}


def mask_example(example: dict) -> dict:
    """A TFDS example of a jaxseg dataset as numpy: the image, (H, W) semantic labels and, where the
    dataset has them, panoptic ids with their segment table."""
    out = {"image": np.asarray(example["image"]), "semantic": np.asarray(example["semantic"])[..., 0]}
    if "panoptic" in example:
        out["panoptic"] = np.asarray(example["panoptic"])
        out["segments"] = {k: np.asarray(example["segments"][k]).astype(dtype)
                           for k, dtype in _SEGMENT_DTYPES.items()}
        out["segments"]["bbox"] = out["segments"]["bbox"].reshape(-1, 4)
    return out


def _slot_map(panoptic: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Dataset segment ids (e.g. COCO's RGB-encoded ones) -> slot + 1 of each segment, 0 elsewhere."""
    slots = np.zeros(panoptic.shape, np.int32)
    for slot, segment_id in enumerate(ids):
        slots[panoptic == segment_id] = slot + 1
    return slots


class _EomtPredictor:
    fixed_shape = True

    def __init__(self, method, canvas: tuple[int, int] | None = None):
        self.method = method
        self.crop = method.crop_size
        self._canvas = tuple(canvas) if canvas else (self.crop, self.crop)

    def canvas(self, example: dict) -> tuple[int, int]:
        return self._canvas

    def _final_logits(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self.method.network.apply({"params": params}, images)
        return out["class_logits"][-1], out["mask_logits"][-1]

    def targets(self, example: dict) -> dict:
        example = mask_example(example)
        target = {"semantic": example["semantic"]}
        if "segments" in example:
            segments = example["segments"]
            target["panoptic"] = _slot_map(example["panoptic"], segments["id"])
            target["segments"] = {k: segments[k] for k in ("category_id", "iscrowd", "is_thing")}
        return target

    @staticmethod
    def _size(example: dict) -> tuple[int, int]:
        return tuple(np.asarray(example["image"]).shape[:2])


class _WholeImagePredictor(_EomtPredictor):
    kind: str
    thresholds: dict = {}
    num_instances = 0

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        return resize_pad_inputs(np.asarray(example["image"]), self.crop, self._canvas)

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        class_logits, mask_logits = resize_pad_logits(lambda images: self._final_logits(params, images), batch,
                                                      self.crop, lambda image: image / 255)
        valid = jax.vmap(valid_pixels, in_axes=(0, None))(batch["size"], self._canvas)

        def one(class_logits, mask_logits, valid):
            semantic = jnp.argmax(semantic_scores(class_logits, mask_logits), axis=0).astype(jnp.int32)
            if self.kind == "instance":
                masks, classes, scores = instance_predictions(class_logits, mask_logits, self.num_instances)
                return {"semantic": semantic,
                        "instances": {"masks": masks, "classes": classes, "scores": scores}}
            ids, categories = panoptic_segments(class_logits, mask_logits, self.method.is_thing, valid=valid,
                                                **self.thresholds)
            return {"semantic": semantic, "panoptic": ids, "segment_categories": categories,
                    "segment_scores": jax.nn.softmax(class_logits, axis=-1).max(-1)}
        return jax.vmap(one)(class_logits, mask_logits, valid)

    def finish(self, outputs: dict, example: dict) -> dict:
        height, width = self._size(example)
        out = {"semantic": outputs["semantic"][:height, :width]}
        if self.kind == "instance":
            instances = outputs["instances"]
            out["instances"] = dict(instances, masks=instances["masks"][:, :height, :width])
            return out
        out["panoptic"] = outputs["panoptic"][:height, :width]
        categories, scores = outputs["segment_categories"], outputs["segment_scores"]
        out["segments"] = [{"id": int(i), "category_id": int(categories[i]),
                            "is_thing": bool(self.method.is_thing[categories[i]]), "score": float(scores[i - 1])}
                           for i in np.unique(out["panoptic"]) if i > 0]
        return out


class PanopticPredictor(_WholeImagePredictor):
    """`canvas`: the largest (H, W) an image may have (default: the crop); the post-processing thresholds
    of `panoptic_segments`."""
    kind = "panoptic"

    def __init__(self, method, canvas: tuple[int, int] | None = None, score_threshold: float = 0.8,
                 mask_threshold: float = 0.5, overlap_threshold: float = 0.8):
        super().__init__(method, canvas)
        self.thresholds = dict(score_threshold=score_threshold, mask_threshold=mask_threshold,
                               overlap_threshold=overlap_threshold)


class InstancePredictor(_WholeImagePredictor):
    """`canvas`: the largest (H, W) an image may have (default: the crop); `num_instances`: the top
    (query, class) pairs kept per image."""
    kind = "instance"

    def __init__(self, method, canvas: tuple[int, int] | None = None, num_instances: int = 100):
        super().__init__(method, canvas)
        self.num_instances = num_instances


class SlidingWindowPredictor(_EomtPredictor):
    """"semantic": `canvas` the largest side an image may have (a square canvas; default: the crop),
    `max_windows` the most crops along the longer side once the shorter side is one crop."""

    def __init__(self, method, canvas: int | tuple[int, int] | None = None, max_windows: int = 2):
        side = max(canvas) if isinstance(canvas, (tuple, list)) else canvas
        super().__init__(method, (side, side) if side else None)
        self.max_windows = max_windows

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        return sliding_inputs(np.asarray(example["image"]), self.crop, self._canvas[0], self.max_windows)

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        score_fn = mask_classification_score_fn(lambda windows: self._final_logits(params, windows))
        scores = sliding_scores(score_fn, batch, self.crop, lambda image: image / 255)
        return {"semantic": jnp.argmax(scores, axis=1).astype(jnp.int32)}

    def finish(self, outputs: dict, example: dict) -> dict:
        height, width = self._size(example)
        return {"semantic": outputs["semantic"][:height, :width]}


PREDICTORS = {"panoptic": PanopticPredictor, "instance": InstancePredictor, "semantic": SlidingWindowPredictor}
