"""CAM inference and pseudo-labels for weakly supervised segmentation (WeakTr / MCTformer stage 1).

Per image (`engine.py` generate_attention_maps_ms, `evaluation.py` of the originals):
  1. passes at several scales (the image resized with bicubic, then cropped to a multiple of the patch
     size as the patch embedding floors it), each also horizontally flipped;
  2. per pass the fused CAM M is refined by the patch affinity, R = PA . M (unless the CAM function gives
     no PA: a model whose attention is too diffuse for refinement), upsampled bilinearly to the
     original size, multiplied by the image labels (absent classes become 0) and un-flipped;
  3. the passes are summed and each present class min-max normalised to [0, 1];
  4. pseudo-label: argmax over [background plane at threshold t, present-class maps]; background is 0 and
     class c becomes c + 1. Every pixel gets a label (no ignore).
Image sizes vary, so this runs per image on the host around a jitted model call (one compilation per
distinct input size).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.metrics.semantic import confusion_matrix, miou_from_confusion
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import resize

Array = jax.Array
# (1, H, W, 3) image -> (fused CAM (1, C, h, w), patch attention (1, h*w, h*w) or None: no refinement).
CamFn = Callable[[Array], tuple[Array, Array | None]]


def foreground_labels(semantic, num_foreground: int) -> np.ndarray:
    """Category ids -> WSSS labels when the first `num_foreground` categories are the foreground (the
    scenes' things, COCO panoptic's 80 things): category c -> c + 1, other categories -> 0 (background),
    255 kept."""
    semantic = np.asarray(semantic).astype(np.int64)
    return np.where(semantic == 255, 255, np.where(semantic < num_foreground, semantic + 1, 0))


def refine(fused_cam: Array, patch_attention: Array) -> Array:
    """R = PA . M: (B, C, h, w) and (B, P, P) -> (B, C, h, w), R[b, c, i] = sum_j PA[b, i, j] M[b, c, j]."""
    batch, classes = fused_cam.shape[:2]
    flat = fused_cam.reshape(batch, classes, -1)
    return jnp.einsum("bij,bcj->bci", patch_attention, flat).reshape(fused_cam.shape)


def multiscale_cams(cam_fn: CamFn, image: Array, labels: Array, patch_size: int,
                    scales: Sequence[float] = (1.0, 1.2)) -> Array:
    """Summed refined CAMs (C, H, W) of one (H, W, 3) image over scales x {plain, flipped}; `labels` (C,)
    multi-hot zeroes the absent classes."""
    height, width = image.shape[:2]
    labels = jnp.asarray(labels, jnp.float32)
    total = None
    for scale in scales:
        size = (round(scale * height), round(scale * width))
        scaled = resize(jnp.asarray(image, jnp.float32), size, method="bicubic", antialias=True, axes=(0, 1))
        rows, cols = size[0] // patch_size * patch_size, size[1] // patch_size * patch_size
        if rows == 0 or cols == 0:
            raise ValueError(f"scale {scale} makes the {height}x{width} image smaller than one patch")
        scaled = scaled[:rows, :cols]
        for flip in (False, True):
            view = scaled[:, ::-1] if flip else scaled
            fused, patch_attention = cam_fn(view[None])
            cam = (fused if patch_attention is None else refine(fused, patch_attention))[0]
            cam = resize(cam, (height, width), method="bilinear", axes=(1, 2)) * labels[:, None, None]
            cam = cam[:, :, ::-1] if flip else cam
            total = cam if total is None else total + cam
    return total


def normalize_cams(cams: Array, labels: Array) -> Array:
    """Per-class min-max normalisation to [0, 1] of (C, H, W) CAMs; absent classes are 0."""
    low = cams.min((1, 2), keepdims=True)
    high = cams.max((1, 2), keepdims=True)
    normalized = (cams - low) / (high - low + 1e-8)
    return jnp.where(jnp.asarray(labels, bool)[:, None, None], normalized, 0.0)


def image_cams(cam_fn: CamFn, image: np.ndarray, labels: Array, patch_size: int,
               scales: Sequence[float] = (1.0, 1.2)) -> Array:
    """Steps 1-3 for one uint8 (H, W, 3) image: (C, H, W) CAMs, ImageNet-normalised input, absent
    classes 0, present ones min-max normalised."""
    image = normalize(jnp.asarray(image, jnp.float32) / 255)
    return normalize_cams(multiscale_cams(cam_fn, image, labels, patch_size, scales), labels)


def pseudo_label(normalized: Array, labels: Array, threshold: float) -> Array:
    """(H, W) int32 label map: 0 where no present class beats the background plane `threshold`, else the
    best present class c as c + 1."""
    present = jnp.asarray(labels, bool)[:, None, None]
    scores = jnp.where(present, normalized, -jnp.inf)
    background = jnp.full((1,) + normalized.shape[1:], threshold, normalized.dtype)
    return jnp.argmax(jnp.concatenate([background, scores]), axis=0).astype(jnp.int32)


class ThresholdSweep:
    """CAM evaluation over a split, fed one image at a time (memory stays one (T, K, K) confusion stack
    however many images): mIoU (background + C classes, GT `ignore_index` ignored) of the pseudo-labels
    at each of T background thresholds."""

    def __init__(self, num_foreground: int, thresholds: Sequence[float], ignore_index: int = 255):
        self.thresholds = list(thresholds)
        self.num_classes = 1 + num_foreground
        self.ignore_index = ignore_index
        self.confusions = np.zeros((len(self.thresholds), self.num_classes, self.num_classes), np.int64)

    def add(self, normalized_cams: Array, image_labels: Array, ground_truth: Array) -> None:
        """One image: (C, H, W) normalised CAMs, (C,) multi-hot labels, (H, W) ground-truth labels."""
        if normalized_cams.shape[0] != self.num_classes - 1:
            raise ValueError(f"expected CAMs of {self.num_classes - 1} classes, got {normalized_cams.shape[0]}")
        # `pseudo_label` at every threshold at once: the best present class wins where it beats the
        # background plane (argmax gives ties to the background, listed first).
        present = jnp.asarray(image_labels, bool)[:, None, None]
        scores = jnp.where(present, jnp.asarray(normalized_cams), -jnp.inf)
        thresholds = jnp.asarray(self.thresholds, scores.dtype)[:, None, None]
        predictions = jnp.where(scores.max(0) > thresholds, scores.argmax(0) + 1, 0)
        count = jax.vmap(lambda prediction: confusion_matrix(jnp.asarray(ground_truth), prediction, self.num_classes,
                                                             ignore_index=self.ignore_index))
        self.confusions += np.asarray(count(predictions), np.int64)

    def result(self) -> dict:
        """{"thresholds", "miou": per threshold, "best_threshold", "best_miou", "per_class_iou": at the best
        threshold}."""
        results = [miou_from_confusion(c) for c in self.confusions]
        mious = [float(r["mean_iou"]) for r in results]
        best = int(np.nanargmax(mious))
        return {"thresholds": self.thresholds, "miou": mious, "best_threshold": self.thresholds[best],
                "best_miou": mious[best], "per_class_iou": results[best]["per_class_iou"]}
