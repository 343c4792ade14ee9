"""COCO instance-segmentation mask AP / AR exactly as pycocotools' `COCOeval(iouType="segm")`.

AP needs one sort by score over every detection of the dataset, so it cannot be a running sum. The
work is split in two:
  - `instance_stats`: one image in, the pairwise mask intersections and the mask areas out: all that
    COCOeval uses of the pixels. Pure and jit-able; `jax.vmap` it over a padded batch and run it
    where the masks are, so full-resolution masks never reach the host.
  - `InstanceAccumulator` (host, numpy): `update` keeps a small record per image (per category: scores,
    areas and the detection x ground-truth IoU matrix), `evaluate` runs COCOeval's evaluate,
    accumulate and summarize over all records. On several hosts, gather the stats (e.g.
    `jax.experimental.multihost_utils.process_allgather`) and update one accumulator.

Input convention for one image of H x W pixels with N prediction and G ground-truth slots:
  masks (N, H, W) / (G, H, W) bool; classes (N,) / (G,) integer in [0, K); scores (N,) float;
  iscrowd (G,); optional validity (N,) / (G,) bool. Unused slots are dropped as if absent, so an
  example with every slot unused (batch padding) contributes nothing.
As a COCO evaluation: categories 0..K-1 are the sorted category ids, an image's ground truth is its
annotations with area = the mask's pixel count (COCO's JSON carries polygon areas instead; only the
small / medium / large numbers depend on them), and its predictions are the result entries of the image
with area = the mask's pixel count, as `COCO.loadRes` computes. Images count in the order they are
added, predictions in slot order; both orders only decide between equal scores (COCOeval takes images
by sorted id and results in file order).

Semantics (COCOeval with default parameters, area ranges optionally replaced):
  - Per image and category the detections are sorted by score (stable), at most 100 kept.
  - IoU = |d & g| / |d | g|; for crowd ground truth |d & g| / |d|.
  - For each area range [lo, hi] (bounds inclusive) and IoU threshold t in 0.50:0.05:0.95, ground truth
    is ignored when crowd or its area lies outside the range. In score order each detection takes the
    ground truth with the highest IoU >= t among those not yet taken (crowd ones can be taken again),
    regular ground truth before ignored, the later one on equal IoU. A detection matched to ignored
    ground truth is ignored, and so is an unmatched one whose area lies outside the range.
  - Per category, area range and maxDets m in (1, 10, 100): the top m detections of each image are
    pooled over images and sorted by score (stable); precision at the 101 recall points 0:0.01:1 is the
    highest precision at any recall >= that point (0 above the highest recall reached); recall is the
    final recall. Categories without non-ignored ground truth get -1 and are left out of the means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError

# pycocotools' Params.setDetParams, built the same way so that the thresholds are the same doubles.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
COCO_AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))
AREA_LABELS = ("all", "small", "medium", "large")
# (name, AP or AR, IoU threshold index or None for the mean, area range index, maxDets index):
# COCOeval.summarize's 12 numbers in its order.
SUMMARY = (("AP", True, None, 0, 2), ("AP50", True, 0, 0, 2), ("AP75", True, 5, 0, 2),
           ("APs", True, None, 1, 2), ("APm", True, None, 2, 2), ("APl", True, None, 3, 2),
           ("AR1", False, None, 0, 0), ("AR10", False, None, 0, 1), ("AR100", False, None, 0, 2),
           ("ARs", False, None, 1, 2), ("ARm", False, None, 2, 2), ("ARl", False, None, 3, 2))


def _table(name: str, table, length: int, kind: str) -> jax.Array:
    table = jnp.asarray(table)
    if table.shape != (length,):
        raise UserError(f"{name} must have shape ({length},), got {table.shape}")
    if kind == "integer" and not jnp.issubdtype(table.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer classes, got dtype {table.dtype}")
    if kind == "float" and not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {table.dtype}")
    return table


def instance_stats(pred_masks: jax.Array, pred_classes: jax.Array, pred_scores: jax.Array,
                   gt_masks: jax.Array, gt_classes: jax.Array, gt_iscrowd: jax.Array, *,
                   pred_valid: jax.Array | None = None,
                   gt_valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """What COCOeval needs of one image's masks (input convention: module docstring).

    Pure and jit-able; `jax.vmap` it over a batch. Shapes are checked, values in
    `InstanceAccumulator.update`.

    Args:
      pred_masks: (N, H, W) bool predicted masks.
      pred_classes: (N,) integer class of each prediction.
      pred_scores: (N,) float score of each prediction.
      gt_masks: (G, H, W) bool ground-truth masks.
      gt_classes: (G,) integer class of each ground-truth instance.
      gt_iscrowd: (G,) bool or 0/1 crowd flags.
      pred_valid, gt_valid: optional (N,) / (G,) bool, whether each slot is used (default: all).

    Returns:
      {"intersection": (N, G) int32 pixel counts of pred & gt, "pred_area": (N,) int32,
       "gt_area": (G,) int32, "pred_classes": (N,) int32, "pred_scores": (N,) as given,
       "gt_classes": (G,) int32, "gt_iscrowd", "pred_valid": (N,), "gt_valid": (G,) bool}.
    """
    pred_masks, gt_masks = jnp.asarray(pred_masks), jnp.asarray(gt_masks)
    for name, masks in (("pred_masks", pred_masks), ("gt_masks", gt_masks)):
        if masks.ndim != 3 or masks.dtype != jnp.bool_:
            raise UserError(f"{name} must be (instances, H, W) bool, got {masks.dtype} of shape "
                            f"{masks.shape}")
    if pred_masks.shape[1:] != gt_masks.shape[1:]:
        raise UserError(f"pred_masks {pred_masks.shape} and gt_masks {gt_masks.shape} differ in H, W")
    if pred_masks.shape[1] * pred_masks.shape[2] > 2 ** 24:
        raise UserError(f"masks of {pred_masks.shape[1:]} have more than 2**24 pixels: float32 "
                        "intersection counts would not be exact")
    num_pred, num_gt = pred_masks.shape[0], gt_masks.shape[0]
    pred_valid = (jnp.ones(num_pred, bool) if pred_valid is None
                  else _table("pred_valid", pred_valid, num_pred, "any") != 0)
    gt_valid = (jnp.ones(num_gt, bool) if gt_valid is None
                else _table("gt_valid", gt_valid, num_gt, "any") != 0)
    return _instance_stats(pred_masks, _table("pred_classes", pred_classes, num_pred, "integer"),
                           _table("pred_scores", pred_scores, num_pred, "float"), gt_masks,
                           _table("gt_classes", gt_classes, num_gt, "integer"),
                           _table("gt_iscrowd", gt_iscrowd, num_gt, "any") != 0, pred_valid, gt_valid)


@jax.jit
def _instance_stats(pred_masks, pred_classes, pred_scores, gt_masks, gt_classes, gt_iscrowd, pred_valid,
                    gt_valid):
    pixels = pred_masks.shape[1] * pred_masks.shape[2]  # explicit: -1 cannot be inferred for 0 masks
    pred = pred_masks.reshape(pred_masks.shape[0], pixels).astype(jnp.bfloat16)
    gt = gt_masks.reshape(gt_masks.shape[0], pixels).astype(jnp.bfloat16)
    # A matmul on the accelerator's fast path, yet exact: 0 and 1 survive any input rounding and the
    # float32 sums stay integers below 2**24.
    intersection = jnp.einsum("np,gp->ng", pred, gt, preferred_element_type=jnp.float32)
    return {"intersection": intersection.astype(jnp.int32),
            "pred_area": pred_masks.sum((1, 2), dtype=jnp.int32),
            "gt_area": gt_masks.sum((1, 2), dtype=jnp.int32),
            "pred_classes": pred_classes.astype(jnp.int32), "pred_scores": pred_scores,
            "gt_classes": gt_classes.astype(jnp.int32), "gt_iscrowd": gt_iscrowd,
            "pred_valid": pred_valid, "gt_valid": gt_valid}


def _match(record: dict, area_ranges: np.ndarray):
    """COCOeval.evaluateImg for one image and category, for every area range and IoU threshold.

    Returns (matched, ignored, num_gt): (A, T, D) bool, whether each detection is matched and whether
    it is ignored, and the (A,) count of non-ignored ground truth."""
    iou, dt_area, gt_area, crowd = record["iou"], record["dt_area"], record["gt_area"], record["crowd"]
    lo, hi = area_ranges[:, :1], area_ranges[:, 1:]
    gt_ignore = crowd | (gt_area < lo) | (gt_area > hi)                                  # (A, G)
    num_gt, num_dt = gt_area.shape[0], dt_area.shape[0]
    shape = (area_ranges.shape[0], IOU_THRESHOLDS.shape[0])
    thresholds = IOU_THRESHOLDS[:, None]                                                 # (T, 1)
    matched, ignored = np.zeros(shape + (num_dt,), bool), np.zeros(shape + (num_dt,), bool)
    taken = np.zeros(shape + (num_gt,), bool)
    # A detection below every threshold matches nothing and leaves `taken` as it is.
    for d in np.flatnonzero((iou >= thresholds.min()).any(1)):
        candidate = (iou[d] >= thresholds) & ~(taken & ~crowd)                           # (A, T, G)
        # COCOeval scans regular GT first and stops at the ignored ones once it holds a regular match;
        # its `>=` scan leaves the last of equal IoUs.
        regular = candidate & ~gt_ignore[:, None]
        candidate = np.where(regular.any(-1, keepdims=True), regular, candidate)
        value = np.where(candidate, iou[d], -1.0)
        best = candidate & (value == value.max(-1, keepdims=True))
        gt_index = num_gt - 1 - np.argmax(best[..., ::-1], axis=-1)                     # (A, T)
        found = candidate.any(-1)
        matched[..., d] = found
        ignored[..., d] = found & np.take_along_axis(gt_ignore, gt_index, axis=1)
        a, t = np.nonzero(found)
        taken[a, t, gt_index[a, t]] = True
    outside = (dt_area < lo) | (dt_area > hi)                                            # (A, D)
    ignored |= ~matched & outside[:, None]
    return matched, ignored, (~gt_ignore).sum(1)


def _interpolated_precision(tp_sum: np.ndarray, fp_sum: np.ndarray, num_gt: int):
    """COCOeval.accumulate's precision at RECALL_THRESHOLDS and final recall, per IoU threshold.

    tp_sum, fp_sum: (T, D) cumulative counts over the score-sorted detections."""
    num_dt = tp_sum.shape[1]
    if num_dt == 0:
        return np.zeros((tp_sum.shape[0], RECALL_THRESHOLDS.shape[0])), np.zeros(tp_sum.shape[0])
    recall = tp_sum / num_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    at_thresholds = []
    for rc, pr in zip(recall, precision):
        index = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        at_thresholds.append(np.where(index < num_dt, pr[np.minimum(index, num_dt - 1)], 0.0))
    return np.stack(at_thresholds), recall[:, -1]


def _mean_valid(values: np.ndarray, missing: float) -> float:
    values = values[values > -1]
    return float(np.mean(values)) if values.size else missing


class InstanceAccumulator:
    """COCO mask AP over a dataset, from per-image `instance_stats` (semantics: module docstring).

    Host-side numpy. `update` with each image (or batch) of stats, then `evaluate`.
    """

    def __init__(self, num_categories: int):
        self.num_categories = num_categories
        # Per image: {category: {"scores", "dt_area": (D,) score-sorted top 100, "gt_area", "crowd": (G,),
        # "iou": (D, G) float64}} for the categories with a detection or ground truth there.
        self._images: list[dict[int, dict[str, np.ndarray]]] = []

    def update(self, stats: dict) -> None:
        """Adds `instance_stats` of one image, or of a batch (every array with a leading batch axis).

        Raises ValueError for used slots with a class outside [0, num_categories).
        """
        stats = {key: np.asarray(value) for key, value in jax.device_get(stats).items()}
        if stats["pred_scores"].ndim == 1:
            stats = {key: value[None] for key, value in stats.items()}
        for index in range(stats["pred_scores"].shape[0]):
            self._images.append(self._record({key: value[index] for key, value in stats.items()}))

    def merge(self, other: InstanceAccumulator) -> None:
        """Adds the images of another accumulator (e.g. another host's)."""
        self._images += other._images

    def _record(self, stats: dict) -> dict[int, dict[str, np.ndarray]]:
        pred_valid, gt_valid = stats["pred_valid"].astype(bool), stats["gt_valid"].astype(bool)
        for name, classes, used in (("pred_classes", stats["pred_classes"], pred_valid),
                                    ("gt_classes", stats["gt_classes"], gt_valid)):
            bad = used & ((classes < 0) | (classes >= self.num_categories))
            if bad.any():
                raise UserError(f"{name} of used slots must lie in [0, {self.num_categories}), "
                                 f"found {np.unique(classes[bad])[:8].tolist()}")
        scores = stats["pred_scores"].astype(np.float64)
        record = {}
        for category in np.unique(np.concatenate([stats["pred_classes"][pred_valid],
                                                  stats["gt_classes"][gt_valid]])):
            dt = np.flatnonzero(pred_valid & (stats["pred_classes"] == category))
            # COCOeval keeps the top 100; matching is greedy in score order, so the rest could not
            # change any number and need not be kept.
            dt = dt[np.argsort(-scores[dt], kind="mergesort")][:MAX_DETS[-1]]
            gt = np.flatnonzero(gt_valid & (stats["gt_classes"] == category))
            dt_area = stats["pred_area"][dt].astype(np.int64)
            gt_area = stats["gt_area"][gt].astype(np.int64)
            crowd = stats["gt_iscrowd"][gt].astype(bool)
            intersection = stats["intersection"][np.ix_(dt, gt)].astype(np.int64)
            union = np.where(crowd, dt_area[:, None], dt_area[:, None] + gt_area - intersection)
            # pycocotools' rleIou: the ratio of the two integer counts in double, 0 without overlap.
            iou = np.where(intersection > 0, intersection / np.maximum(union, 1), 0.0)
            record[int(category)] = {"scores": scores[dt], "dt_area": dt_area, "gt_area": gt_area,
                                     "crowd": crowd, "iou": iou}
        return record

    def evaluate(self, area_ranges=COCO_AREA_RANGES) -> dict:
        """COCOeval evaluate + accumulate + summarize over every image added so far.

        Args:
          area_ranges: 4 inclusive (lo, hi) pixel-area ranges labelled all, small, medium, large
            (default COCO's: all, <= 32**2, 32**2..96**2, >= 96**2).

        Returns:
          {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl": float,
           COCOeval.stats in its order, -1 where no category has non-ignored ground truth;
           "per_class_AP": (K,) float64 AP (IoU 0.50:0.95, area all, 100 detections), NaN where the
           category has no non-ignored ground truth;
           "precision": (T=10, R=101, K, A=4, M=3) and "recall": (T, K, A, M) float64, COCOeval's
           eval["precision"] / eval["recall"], -1 where undefined}.
        """
        area_ranges = np.asarray(area_ranges, np.float64)
        if area_ranges.shape != (len(AREA_LABELS), 2):
            raise UserError(f"area_ranges must be {len(AREA_LABELS)} (lo, hi) pairs for "
                            f"{AREA_LABELS}, got shape {area_ranges.shape}")
        num_t, num_r, num_a = IOU_THRESHOLDS.shape[0], RECALL_THRESHOLDS.shape[0], area_ranges.shape[0]
        precision = -np.ones((num_t, num_r, self.num_categories, num_a, len(MAX_DETS)))
        recall = -np.ones((num_t, self.num_categories, num_a, len(MAX_DETS)))
        for k in range(self.num_categories):
            blocks = [(image[k]["scores"], *_match(image[k], area_ranges))
                      for image in self._images if k in image]
            for a in range(num_a):
                num_gt = sum(int(gt_count[a]) for *_, gt_count in blocks)
                if num_gt == 0:
                    continue
                for m, max_det in enumerate(MAX_DETS):
                    scores = np.concatenate([s[:max_det] for s, *_ in blocks])
                    order = np.argsort(-scores, kind="mergesort")
                    matched = np.concatenate([mt[a, :, :max_det] for _, mt, _, _ in blocks], 1)[:, order]
                    ignored = np.concatenate([ig[a, :, :max_det] for _, _, ig, _ in blocks], 1)[:, order]
                    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(float)
                    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(float)
                    precision[:, :, k, a, m], recall[:, k, a, m] = _interpolated_precision(
                        tp_sum, fp_sum, num_gt)

        results = {}
        for name, is_ap, t, a, m in SUMMARY:
            values = precision[:, :, :, a, m] if is_ap else recall[:, :, a, m]
            results[name] = _mean_valid(values if t is None else values[t], -1.0)
        results["per_class_AP"] = np.array([_mean_valid(precision[:, :, k, 0, 2], np.nan)
                                            for k in range(self.num_categories)])
        results["precision"], results["recall"] = precision, recall
        return results
