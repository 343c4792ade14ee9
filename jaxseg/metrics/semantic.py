"""Semantic-segmentation metrics: a confusion-matrix accumulator and the mIoU read out of it.

scenic's recipe: every evaluation step builds a (K, K) confusion matrix inside jit, the matrices of all
batches and hosts are summed, and the ratios are taken once, on the host, from the total. Averaging
per-batch mIoUs instead would weight batches rather than pixels and count a class absent from one batch
as a zero there.

Accumulating is plain addition: `total += np.asarray(confusion_matrix(...), np.int64)` on the host
(int64 because one cell of a large dataset can pass 2**31 pixels), after a cross-host sum of the batch
matrices where each host holds a part of the batch (`jax.lax.psum` inside a `shard_map`, or a process
sum of the host-local matrices).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError


def _check_integer(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")


def _raise_if_out_of_range(name: str, values: np.ndarray, counted: np.ndarray, num_classes: int,
                           allowed: str) -> None:
    bad = counted & ((values < 0) | (values >= num_classes))
    if bad.any():
        raise UserError(f"{name} must lie in {allowed}, found {np.unique(values[bad])[:8].tolist()}")


def _counted(labels, weights, ignore_index):
    """Pixels to count (numpy or jax): not ignored, and of nonzero weight along the leading axes."""
    counted = labels != ignore_index
    if weights is not None:
        counted &= (weights != 0).reshape(weights.shape + (1,) * (labels.ndim - weights.ndim))
    return counted


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int, *,
                     ignore_index: int = 255, weights: jax.Array | None = None) -> jax.Array:
    """Counts the evaluated pixels by (ground-truth class, predicted class).

    Pure and jit-able with static shapes (`num_classes` and `ignore_index` static).

    Args:
      labels: integer array of any shape, e.g. (B, H, W); class ids in [0, num_classes), or `ignore_index`
        for pixels that are not evaluated.
      predictions: integer array of the same shape (e.g. the argmax of the class scores), class ids in
        [0, num_classes).
      num_classes: K.
      ignore_index: label of the pixels left out.
      weights: optional validity mask over the leading axes of `labels`, of shape `labels.shape[:n]`:
        (B,) drops the padded examples of an evaluation batch, (B, H, W) masks single pixels. A pixel
        counts once where its weight is nonzero; any dtype, so scenic's float `batch_mask` works as is.

    Returns:
      (K, K) int32 matrix: entry [i, j] is the number of counted pixels labelled i and predicted j
      (rows ground truth, columns prediction).

    Out-of-range values among the counted pixels (a label outside [0, K) that is not `ignore_index`, a
    prediction outside [0, K)) raise ValueError when called eagerly. Under jit the values cannot be
    checked and such pixels are left out of the matrix, so they count neither as right nor as wrong.
    """
    labels, predictions = jnp.asarray(labels), jnp.asarray(predictions)
    _check_integer("labels", labels)
    _check_integer("predictions", predictions)
    if labels.shape != predictions.shape:
        raise UserError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    if num_classes < 1:
        raise UserError(f"num_classes must be positive, got {num_classes}")
    if weights is not None:
        weights = jnp.asarray(weights)
        if labels.shape[:weights.ndim] != weights.shape:
            raise UserError(f"weights of shape {weights.shape} must match the leading axes of labels "
                            f"{labels.shape}")
    if not any(isinstance(x, jax.core.Tracer) for x in (labels, predictions, weights)):
        # Called eagerly the values can be checked (on the host: no per-shape compilation).
        labels_np, predictions_np, weights_np = jax.device_get((labels, predictions, weights))
        counted = _counted(labels_np.astype(np.int64), weights_np, ignore_index)
        _raise_if_out_of_range("labels", labels_np, counted, num_classes,
                               f"[0, {num_classes}) or be ignore_index={ignore_index}")
        _raise_if_out_of_range("predictions", predictions_np, counted, num_classes, f"[0, {num_classes})")
    return _confusion_matrix(labels, predictions, weights, num_classes, ignore_index)


# One compiled program per input shape: an eager call would otherwise compile each of its operations.
@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _confusion_matrix(labels, predictions, weights, num_classes, ignore_index):
    labels, predictions = labels.astype(jnp.int32), predictions.astype(jnp.int32)
    in_range = (labels >= 0) & (labels < num_classes) & (predictions >= 0) & (predictions < num_classes)
    counted = _counted(labels, weights, ignore_index) & in_range
    cell = jnp.where(counted, labels * num_classes + predictions, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[cell.ravel()].add(
        counted.ravel().astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def _mean_of_defined(values: np.ndarray) -> float:
    defined = ~np.isnan(values)
    return float(values[defined].mean()) if defined.any() else float("nan")


def miou_from_confusion(confusion) -> dict:
    """Mean IoU and accuracies from a (K, K) confusion matrix, typically summed over a whole dataset.

    Host-side numpy in float64, so int64 totals beyond int32 are read exactly (jax without x64 would
    truncate them).

    Returns a dict:
      per_class_iou: (K,) TP / (TP + FP + FN), NaN for a class absent from both ground truth and
        prediction.
      mean_iou: mean of the defined per-class IoUs (scenic's nanmean).
      per_class_accuracy: (K,) TP / ground-truth pixels, NaN for a class absent from the ground truth.
      mean_class_accuracy: mean of the defined per-class accuracies.
      pixel_accuracy: correctly predicted / counted pixels.
    A matrix with no counted pixel gives NaN for every value.
    """
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise UserError(f"confusion matrix must be square (K, K), got shape {confusion.shape}")
    confusion = confusion.astype(np.float64)
    true_positives = np.diag(confusion)
    gt_pixels, predicted_pixels = confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore"):  # 0 / 0 marks a class with nothing to score: NaN on purpose
        iou = true_positives / (gt_pixels + predicted_pixels - true_positives)
        class_accuracy = true_positives / gt_pixels
        pixel_accuracy = true_positives.sum() / confusion.sum()
    return {
        "per_class_iou": iou,
        "mean_iou": _mean_of_defined(iou),
        "per_class_accuracy": class_accuracy,
        "mean_class_accuracy": _mean_of_defined(class_accuracy),
        "pixel_accuracy": float(pixel_accuracy),
    }
