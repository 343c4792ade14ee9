"""Dataset metrics as accumulators: what the evaluator (`jaxseg.evaluate`) runs.

Each metric has four parts:
  targets(target, canvas)  host: one image's ground truth (the method's target dict, below) -> arrays of
                           static shape, padded to the prediction's canvas;
  stats(prediction, targets)  pure and jit-able, one image: the sums this image adds (vmapped over the
                           batch inside the evaluator's compiled program);
  update(stats) / merge(other) / result()  host: add a batch of stats (padding already dropped), add
                           another host's accumulator, read the metric out once at the end.

Target dicts (written by a method's predictor, in the model's class space):
  "semantic"  (H, W) integer labels, 255 ignored;
  "panoptic"  (H, W) segment slots, 0 void, t = row t - 1 of "segments";
  "segments"  {"category_id", "iscrowd", "is_thing"}: (T,) per segment;
  "labels"    (C,) image-level multi-hot labels.
Padding is neutral by construction: ignored labels, void segments, unused slots, empty masks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.metrics.instance import InstanceAccumulator, instance_stats
from jaxseg.metrics.panoptic import panoptic_stats, pq_from_stats
from jaxseg.metrics.semantic import confusion_matrix, miou_from_confusion

IGNORE = 255


class Metric(Protocol):
    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]: ...

    def stats(self, prediction: dict[str, jax.Array], targets: dict[str, jax.Array]) -> dict[str, jax.Array]: ...

    def update(self, stats: dict[str, np.ndarray]) -> None: ...

    def merge(self, other: Metric) -> None: ...

    def result(self) -> dict: ...


def defined(value: float) -> float | None:
    """A metric for JSON: None where it is undefined (NaN, e.g. the IoU of a class never seen)."""
    return None if np.isnan(value) else float(value)


def pad_to(array: np.ndarray, canvas: tuple[int, int], fill) -> np.ndarray:
    """An (H, W, ...) array in the top-left corner of a `canvas`-sized one filled with `fill`."""
    array = np.asarray(array)
    if array.shape[0] > canvas[0] or array.shape[1] > canvas[1]:
        raise UserError(f"a {array.shape[0]}x{array.shape[1]} image does not fit the {canvas[0]}x{canvas[1]} "
                        f"evaluation canvas")
    out = np.full(tuple(canvas) + array.shape[2:], fill, array.dtype)
    out[:array.shape[0], :array.shape[1]] = array
    return out


class _Summed:
    """update / merge by adding every stats entry into int64 / float64 totals."""

    totals: dict[str, np.ndarray] | None = None

    def update(self, stats: dict[str, np.ndarray]) -> None:
        batch = {k: np.asarray(v).sum(0, dtype=np.float64 if np.asarray(v).dtype.kind == "f" else np.int64)
                 for k, v in stats.items()}
        self.totals = batch if self.totals is None else {k: self.totals[k] + batch[k] for k in batch}

    def merge(self, other: _Summed) -> None:
        if other.totals is not None:
            self.update({k: v[None] for k, v in other.totals.items()})


def semantic_results(confusion: np.ndarray) -> dict:
    result = miou_from_confusion(confusion)
    return {"mean_iou": float(result["mean_iou"]), "pixel_accuracy": float(result["pixel_accuracy"]),
            "per_class_iou": [defined(v) for v in result["per_class_iou"]]}


class SemanticMetric(_Summed):
    """mIoU and pixel accuracy of the "semantic" prediction (label 255 ignored)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        return {"semantic": pad_to(np.asarray(target["semantic"], np.int32), canvas, IGNORE)}

    def stats(self, prediction, targets):
        return {"confusion": confusion_matrix(targets["semantic"], prediction["semantic"], self.num_classes)}

    def result(self) -> dict:
        confusion = self.totals["confusion"] if self.totals else np.zeros((self.num_classes,) * 2, np.int64)
        return semantic_results(confusion)


class PanopticMetric(_Summed):
    """PQ / SQ / RQ (all, things, stuff) of the "panoptic" prediction, as panopticapi. Ground-truth tables
    are padded to `max_segments` slots."""

    def __init__(self, num_classes: int, is_thing: Sequence[bool], max_segments: int = 256):
        self.num_classes, self.is_thing, self.max_segments = num_classes, np.asarray(is_thing, bool), max_segments

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        segments = target["segments"]
        count = len(segments["category_id"])
        if count > self.max_segments:
            raise UserError(f"an image has {count} ground-truth segments, more than max_segments="
                            f"{self.max_segments} of the panoptic metric")

        def table(values, dtype):
            out = np.zeros(self.max_segments, dtype)
            out[:count] = values
            return out
        return {"panoptic": pad_to(np.asarray(target["panoptic"], np.int32), canvas, 0),
                "category_id": table(segments["category_id"], np.int32),
                "iscrowd": table(segments["iscrowd"], bool), "valid": table(True, bool)}

    def stats(self, prediction, targets):
        predicted = prediction["segment_categories"][1:]
        return panoptic_stats(prediction["panoptic"], jnp.maximum(predicted, 0), targets["panoptic"],
                              targets["category_id"], targets["iscrowd"], self.num_classes,
                              pred_valid=predicted >= 0, gt_valid=targets["valid"])

    def result(self) -> dict:
        zeros = np.zeros(self.num_classes)
        totals = self.totals or {k: zeros for k in ("iou_sum", "tp", "fp", "fn")}
        pq = pq_from_stats(totals, self.is_thing)
        results = {f"{key}{suffix}": defined(pq[group][key]) for group, suffix in
                   (("all", ""), ("things", "_things"), ("stuff", "_stuff")) for key in ("PQ", "SQ", "RQ")}
        # The segment counts behind the ratios: matched, unmatched predicted, missed ground-truth segments.
        return dict(results, **{key.upper(): int(np.sum(totals[key])) for key in ("tp", "fp", "fn")})


class InstanceMetric:
    """COCO mask AP of the "instances" prediction against the thing segments (crowd regions ignored as
    COCOeval does). Ground truth is padded to `max_instances` masks."""

    def __init__(self, num_classes: int, max_instances: int = 128):
        self.accumulator = InstanceAccumulator(num_classes)
        self.max_instances = max_instances

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        segments = target["segments"]
        things = np.flatnonzero(np.asarray(segments["is_thing"], bool))
        if len(things) > self.max_instances:
            raise UserError(f"an image has {len(things)} ground-truth instances, more than max_instances="
                            f"{self.max_instances} of the instance metric")
        masks = np.zeros((self.max_instances,) + tuple(canvas), bool)
        panoptic = np.asarray(target["panoptic"])
        for slot, segment in enumerate(things):
            masks[slot] = pad_to(panoptic == segment + 1, canvas, False)
        classes, crowd, valid = (np.zeros(self.max_instances, dtype) for dtype in (np.int32, bool, bool))
        classes[:len(things)] = np.asarray(segments["category_id"])[things]
        crowd[:len(things)] = np.asarray(segments["iscrowd"], bool)[things]
        valid[:len(things)] = True
        return {"masks": masks, "classes": classes, "iscrowd": crowd, "valid": valid}

    def stats(self, prediction, targets):
        instances = prediction["instances"]
        return instance_stats(instances["masks"], instances["classes"], instances["scores"], targets["masks"],
                              targets["classes"], targets["iscrowd"], gt_valid=targets["valid"])

    def update(self, stats: dict[str, np.ndarray]) -> None:
        self.accumulator.update(stats)

    def merge(self, other: InstanceMetric) -> None:
        self.accumulator.merge(other.accumulator)

    def result(self) -> dict:
        ap = self.accumulator.evaluate()
        return {key: float(ap[key]) for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


class CamSweepMetric(_Summed):
    """CAM evaluation of WSSS: mIoU (background + C classes, 255 ignored) of the pseudo-labels at each of
    T background thresholds, from the normalised "cams" (C, H, W) and the image labels. The best
    threshold is the one a run's pseudo-labels take."""

    def __init__(self, num_foreground: int, thresholds: Sequence[float] = tuple(round(0.05 * i, 2)
                                                                                for i in range(2, 20))):
        self.num_foreground, self.thresholds = num_foreground, tuple(float(t) for t in thresholds)

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        return {"semantic": pad_to(np.asarray(target["semantic"], np.int32), canvas, IGNORE),
                "labels": np.asarray(target["labels"][:self.num_foreground], np.float32)}

    def stats(self, prediction, targets):
        # The pseudo-label at every threshold at once: the best present class wins where it beats the
        # background plane (ties go to the background, as `jaxseg.wsss.cam.pseudo_label`'s argmax).
        present = jnp.asarray(targets["labels"], bool)[:, None, None]
        scores = jnp.where(present, prediction["cams"], -jnp.inf)
        thresholds = jnp.asarray(self.thresholds, scores.dtype)[:, None, None]
        labels = jnp.where(scores.max(0) > thresholds, scores.argmax(0) + 1, 0)
        count = jax.vmap(lambda label_map: confusion_matrix(targets["semantic"], label_map, self.num_foreground + 1))
        return {"confusions": count(labels)}

    def result(self) -> dict:
        if self.totals is None:
            raise UserError("the CAM sweep has no image")
        results = [miou_from_confusion(c) for c in self.totals["confusions"]]
        mious = [float(r["mean_iou"]) for r in results]
        best = int(np.nanargmax(mious))
        return {"cam_miou": mious[best], "best_threshold": self.thresholds[best], "cam_miou_curve": mious,
                "thresholds": list(self.thresholds),
                "per_class_iou": [defined(v) for v in results[best]["per_class_iou"]]}
