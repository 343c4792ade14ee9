"""Panoptic quality (PQ, SQ, RQ) exactly as the official COCO `panopticapi.evaluation.pq_compute`.

`panoptic_stats` is the accumulator: one image in, per-category sums (IoU of the matches, TP, FP, FN)
out, pure and jit-able with static shapes. The sums add across images and hosts like panopticapi's
`PQStat +=`; `pq_from_stats` then takes the ratios once, on the host.

Input convention for one image of H x W pixels, with S predicted and T ground-truth segment slots:
  segment-id maps (H, W): 0 is void (no segment); id s in 1..S refers to slot s - 1 of its table.
  tables: the category of each slot, in [0, num_categories), and optionally whether the slot is used.
A slot is a segment when it is used, its category is in range and it owns at least one pixel. Pixels
of the other slots are void, so padded slots (e.g. discarded queries, or a whole padded example with
every slot unused) contribute nothing. Where the id maps come from panopticapi's PNGs and JSON, this
is its input exactly: it requires every predicted segment of the JSON to appear in the PNG, and COCO's
ground-truth areas are those of its PNGs.

Semantics, as panopticapi's `pq_compute_single_core`, with "void" the ground-truth void pixels:
  - A ground-truth segment and a predicted segment of the same category match when
    IoU = |g & p| / (|g| + |p| - |g & p| - |p & void|) > 0.5 (strictly). A match is unique: no two
    segments of either map can both pass that bound with the same partner.
  - Crowd ground-truth segments are never matched, and are not counted as false negatives.
  - An unmatched prediction is not a false positive when more than half of its pixels lie on void or on
    the crowd region of its category. As in panopticapi that region is a single crowd segment: the last
    one of the category in its segment list, here the crowd segment with the highest id.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError


def _as_table(name: str, table, length: int | None, *, integer: bool) -> jax.Array:
    table = jnp.asarray(table)
    if table.ndim != 1 or (length is not None and table.shape[0] != length):
        want = "(slots,)" if length is None else f"({length},)"
        raise UserError(f"{name} must be a {want} table, got shape {table.shape}")
    if integer and not jnp.issubdtype(table.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer category ids, got dtype {table.dtype}")
    return table


def _raise_if_out_of_range(name: str, values: np.ndarray, low: int, high: int,
                           checked: np.ndarray | None = None) -> None:
    bad = (values < low) | (values >= high)
    if checked is not None:
        bad &= checked
    if bad.any():
        raise UserError(f"{name} must lie in [{low}, {high}), found {np.unique(values[bad])[:8].tolist()}")


def _segment_map(ids: jax.Array, categories: jax.Array, used: jax.Array,
                 num_categories: int) -> tuple[jax.Array, jax.Array]:
    """Ids with the pixels of unused slots (and, under jit, out-of-range ids) set to void, and the
    category table with the unused slots set to 0 so that it can index per-category arrays."""
    num_slots = categories.shape[0]
    used &= (categories >= 0) & (categories < num_categories)
    ids = jnp.where((ids >= 0) & (ids <= num_slots), ids, 0)
    ids = jnp.where(jnp.concatenate([jnp.zeros(1, bool), used])[ids], ids, 0)
    return ids, jnp.where(used, categories, 0)


def _per_category(values: jax.Array, categories: jax.Array, num_categories: int) -> jax.Array:
    return jnp.zeros(num_categories, values.dtype).at[categories].add(values)


def panoptic_stats(pred_ids: jax.Array, pred_categories: jax.Array, gt_ids: jax.Array,
                   gt_categories: jax.Array, gt_iscrowd: jax.Array, num_categories: int, *,
                   pred_valid: jax.Array | None = None,
                   gt_valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-category PQ sums of one image (input convention and semantics: module docstring).

    Pure and jit-able (`num_categories` static); `jax.vmap` it over a batch and sum over the batch axis.

    Args:
      pred_ids: (H, W) integer predicted segment-id map, 0 = no segment, s = slot s - 1.
      pred_categories: (S,) integer category of each predicted slot.
      gt_ids: (H, W) integer ground-truth segment-id map, 0 = void, t = slot t - 1.
      gt_categories: (T,) integer category of each ground-truth slot.
      gt_iscrowd: (T,) bool or 0/1, crowd flag of each ground-truth slot.
      num_categories: K; categories are 0..K-1 (map sparse dataset ids, e.g. COCO's, to these first).
      pred_valid, gt_valid: optional (S,) / (T,) bool, whether each slot is used (default: all).

    Returns:
      {"iou_sum": (K,) float32 sum of the IoUs of the matches, "tp", "fp", "fn": (K,) int32 counts},
      indexed by category. Sum them over images (on the host in float64 / int64 for a large dataset).

    Ids outside [0, S] / [0, T] and used slots with a category outside [0, K) raise ValueError when
    called eagerly; under jit those pixels and slots are treated as void and unused.
    """
    pred_ids, gt_ids = jnp.asarray(pred_ids), jnp.asarray(gt_ids)
    for name, ids in (("pred_ids", pred_ids), ("gt_ids", gt_ids)):
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise UserError(f"{name} must be an (H, W) integer segment-id map, got {ids.dtype} "
                            f"of shape {ids.shape}")
    if pred_ids.shape != gt_ids.shape:
        raise UserError(f"pred_ids {pred_ids.shape} and gt_ids {gt_ids.shape} differ in shape")
    pred_categories = _as_table("pred_categories", pred_categories, None, integer=True)
    gt_categories = _as_table("gt_categories", gt_categories, None, integer=True)
    num_pred, num_gt = pred_categories.shape[0], gt_categories.shape[0]
    gt_iscrowd = _as_table("gt_iscrowd", gt_iscrowd, num_gt, integer=False)
    pred_valid = None if pred_valid is None else _as_table("pred_valid", pred_valid, num_pred,
                                                           integer=False)
    gt_valid = None if gt_valid is None else _as_table("gt_valid", gt_valid, num_gt, integer=False)
    arrays = (pred_ids, pred_categories, pred_valid, gt_ids, gt_categories, gt_iscrowd, gt_valid)
    if not any(isinstance(x, jax.core.Tracer) for x in arrays):
        # Called eagerly the values can be checked (on the host: no per-shape compilation).
        pred_ids_np, pred_cat_np, pred_valid_np, gt_ids_np, gt_cat_np, _, gt_valid_np = (
            jax.device_get(arrays))
        _raise_if_out_of_range("pred_ids", pred_ids_np, 0, num_pred + 1)
        _raise_if_out_of_range("gt_ids", gt_ids_np, 0, num_gt + 1)
        _raise_if_out_of_range("categories of used pred slots", pred_cat_np, 0, num_categories,
                               None if pred_valid_np is None else pred_valid_np != 0)
        _raise_if_out_of_range("categories of used gt slots", gt_cat_np, 0, num_categories,
                               None if gt_valid_np is None else gt_valid_np != 0)
    return _panoptic_stats(*arrays, num_categories)


# One compiled program per input shape: an eager call would otherwise compile each of its operations.
@functools.partial(jax.jit, static_argnames="num_categories")
def _panoptic_stats(pred_ids, pred_categories, pred_valid, gt_ids, gt_categories, gt_iscrowd, gt_valid,
                    num_categories):
    num_pred, num_gt = pred_categories.shape[0], gt_categories.shape[0]
    gt_iscrowd = gt_iscrowd != 0
    pred_valid = jnp.ones(num_pred, bool) if pred_valid is None else pred_valid != 0
    gt_valid = jnp.ones(num_gt, bool) if gt_valid is None else gt_valid != 0
    pred_ids, pred_cat = _segment_map(pred_ids.astype(jnp.int32), pred_categories.astype(jnp.int32),
                                      pred_valid, num_categories)
    gt_ids, gt_cat = _segment_map(gt_ids.astype(jnp.int32), gt_categories.astype(jnp.int32),
                                  gt_valid, num_categories)

    # Joint histogram of (gt id, pred id): panopticapi's `gt_pred_map`, row 0 / column 0 being void.
    joint = jnp.bincount((gt_ids * (num_pred + 1) + pred_ids).ravel(),
                         length=(num_gt + 1) * (num_pred + 1)).reshape(num_gt + 1, num_pred + 1)
    overlap = joint[1:, 1:]                                        # (T, S)
    pred_on_void = joint[0, 1:]                                    # (S,)
    gt_area, pred_area = joint[1:].sum(1), joint[:, 1:].sum(0)

    union = gt_area[:, None] + pred_area[None, :] - overlap - pred_on_void[None, :]
    # IoU > 1/2 compared in integers so that a tie at exactly 1/2 never matches. It implies an
    # overlap, so slots without pixels never match.
    matched = ((gt_cat[:, None] == pred_cat[None, :]) & ~gt_iscrowd[:, None]
               & (2 * overlap > union))
    iou = jnp.where(matched, overlap / jnp.maximum(union, 1), 0.0).astype(jnp.float32)
    gt_matched, pred_matched = matched.any(1), matched.any(0)

    gt_is_segment = gt_area > 0
    false_negative = gt_is_segment & ~gt_iscrowd & ~gt_matched

    crowd = gt_is_segment & gt_iscrowd
    last_crowd = jnp.full(num_categories, -1, jnp.int32).at[gt_cat].max(
        jnp.where(crowd, jnp.arange(num_gt, dtype=jnp.int32), -1))[pred_cat]        # (S,)
    if num_gt:
        on_crowd = jnp.where(last_crowd >= 0, overlap[jnp.maximum(last_crowd, 0), jnp.arange(num_pred)], 0)
    else:  # an image without ground-truth segments (nothing to gather from)
        on_crowd = jnp.zeros(num_pred, overlap.dtype)
    excused = 2 * (pred_on_void + on_crowd) > pred_area
    false_positive = (pred_area > 0) & ~pred_matched & ~excused

    return {
        "iou_sum": _per_category(iou.sum(1), gt_cat, num_categories),
        "tp": _per_category(gt_matched.astype(jnp.int32), gt_cat, num_categories),
        "fp": _per_category(false_positive.astype(jnp.int32), pred_cat, num_categories),
        "fn": _per_category(false_negative.astype(jnp.int32), gt_cat, num_categories),
    }


def pq_from_stats(stats: dict, is_thing) -> dict:
    """PQ, SQ and RQ from `panoptic_stats` sums, as panopticapi's `PQStat.pq_average`.

    Host-side numpy in float64. Per category: PQ = iou_sum / (TP + FP/2 + FN/2),
    SQ = iou_sum / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2). Averages run over the categories
    with TP + FP + FN > 0.

    Args:
      stats: {"iou_sum", "tp", "fp", "fn"}, each (K,), summed over the evaluated images.
      is_thing: (K,) bool, True for thing categories, False for stuff.

    Returns:
      {"all" | "things" | "stuff": {"PQ", "SQ", "RQ": float, "n": number of categories averaged},
       "per_class": {"PQ", "SQ", "RQ": (K,) float64}}. Per-class values are NaN for categories with
      TP + FP + FN = 0 (panopticapi writes 0.0 there; both leave them out of the averages), and an
      average over no category is NaN (panopticapi divides by zero).
    """
    iou_sum, tp, fp, fn = (np.asarray(stats[key], np.float64) for key in ("iou_sum", "tp", "fp", "fn"))
    is_thing = np.asarray(is_thing, bool)
    if not (iou_sum.ndim == 1 and iou_sum.shape == tp.shape == fp.shape == fn.shape == is_thing.shape):
        raise UserError(f"stats and is_thing must all be (K,), got iou_sum {iou_sum.shape}, tp {tp.shape},"
                        f" fp {fp.shape}, fn {fn.shape}, is_thing {is_thing.shape}")
    present = tp + fp + fn > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # absent categories become NaN on purpose
        denominator = np.where(present, tp + 0.5 * fp + 0.5 * fn, np.nan)
        per_class = {"PQ": iou_sum / denominator,
                     "SQ": np.where(present, np.where(tp > 0, iou_sum / tp, 0.0), np.nan),
                     "RQ": tp / denominator}
    results = {}
    for group, members in (("all", present), ("things", present & is_thing),
                           ("stuff", present & ~is_thing)):
        n = int(members.sum())
        results[group] = {key: float(values[members].mean()) if n else float("nan")
                          for key, values in per_class.items()}
        results[group]["n"] = n
    results["per_class"] = per_class
    return results
