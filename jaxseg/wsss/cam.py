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

from jaxseg.errors import UserError
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


def wsss_semantic(example: dict, num_foreground: int, label_space: str) -> np.ndarray:
    """(H, W) dense labels of a dataset example in the WSSS label space (0 background, c + 1 class c, 255
    ignored), from a dataset whose labels are in `label_space` (`jaxseg.data.datasets.LABEL_SPACES`)."""
    semantic = np.asarray(example["semantic"])[..., 0]
    return foreground_labels(semantic, num_foreground) if label_space == "categories" else semantic


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
            raise UserError(f"scale {scale} makes the {height}x{width} image smaller than one patch")
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
