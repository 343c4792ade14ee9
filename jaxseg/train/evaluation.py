"""Dataset-level evaluation one image at a time, at each image's own size (datasets' images differ in
size, so they are not batched). Every host runs every image in step: the params may be sharded over
all hosts, so each forward pass needs all of them; the totals are then the same on every host."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxseg.metrics import confusion_matrix, miou_from_confusion

# (params, uint8 (H, W, 3) image) -> {"semantic": (H, W) class map, ...}: a task's `infer`.
InferFn = Callable[..., dict]


def defined(value: float) -> float | None:
    """A metric for JSON: None where it is undefined (NaN, e.g. the IoU of a class never seen)."""
    return None if np.isnan(value) else float(value)


def semantic_results(confusion: np.ndarray) -> dict:
    result = miou_from_confusion(confusion)
    return {"mean_iou": float(result["mean_iou"]), "pixel_accuracy": float(result["pixel_accuracy"]),
            "per_class_iou": [defined(v) for v in result["per_class_iou"]]}


def evaluate_semantic(infer: InferFn, params: Any, source: Sequence[dict],
                      ground_truth: Callable[[dict], np.ndarray], num_classes: int) -> dict:
    """mIoU (label 255 ignored) of `infer`'s "semantic" maps over every example of `source` against
    `ground_truth(example)` ((H, W) labels)."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for index in range(len(source)):
        example = source[index]
        prediction = infer(params, np.asarray(example["image"]))["semantic"]
        confusion += np.asarray(confusion_matrix(ground_truth(example), prediction, num_classes), np.int64)
    return dict(semantic_results(confusion), examples=len(source))
