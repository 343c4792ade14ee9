"""CAM inference and pseudo-labels for weakly supervised segmentation (WeakTr / MCTformer stage 1).

Per image, as the official engine (hustvl/WeakTr `datasets.py` VOC12DatasetMS / COCOClsDatasetMS and
`engine.py` generate_attention_maps_ms; MCTformer's are the same):
  1. views: for each scale s, the uint8 image resized to (round(s * H), round(s * W)) (Python's round)
     by Pillow's bicubic, bit for bit (`jaxseg.ops.resize.pil_resize`; the image itself at its own size),
     then divided by 255 and ImageNet-normalised in float32 (ToTensor, Normalize); each view is also
     flipped horizontally as a whole, and only then does the CAM function drop the pixels beyond whole
     patches (as the original's stride-p patch embedding), so a flipped view of a width that is not a
     multiple of the patch covers other columns than its plain view;
  2. per view, the CAM function's map (WeakTr's fused CAM M or another kind,
     `jaxseg.models.weaktr.select_cam`) is refined by the patch attention, R = PA . M (unless the CAM
     function gives no PA: a model whose attention is too diffuse for refinement), upsampled bilinearly
     (half-pixel centres, no antialiasing) from the patch grid to the image size, multiplied by the image
     labels (absent classes become 0) and, for a flipped view, flipped back;
  3. the views are summed and each present class min-max normalised, (x - min) / (max - min + 1e-8);
  4. pseudo-label: argmax over [background plane at threshold t, present-class maps]; background is 0 and
     class c becomes c + 1. Every pixel gets a label (no ignore).
Where this differs from the official engine: it runs under fp16 autocast (here the model's dtype, float32
by default); it upsamples to the size of the first scale's view, which its scripts always make 1.0 (here
always the image's size, for any order of scales); it saves the present classes only (here absent ones
are 0). Everything has static shapes for a given image size, so the predictor runs it inside jit, one
compilation per distinct image size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import pil_resize, resize

Array = jax.Array
# (1, h, w, 3) normalised view of any size -> (CAM (1, C, h // patch, w // patch) on the view's whole
# patches, patch attention (1, P, P) or None: no refinement).
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


def view_sizes(size: Sequence[int], scales: Sequence[float], patch_size: int) -> list[tuple[int, int]]:
    """(height, width) of the view of an image of `size` at each scale, as the official dataset rounds
    them; a view smaller than one patch is refused."""
    height, width = size
    views = [(round(scale * height), round(scale * width)) for scale in scales]
    for scale, view in zip(scales, views):
        if min(view) < patch_size:
            raise UserError(f"scale {scale} makes the {height}x{width} image {view[0]}x{view[1]}, smaller than one "
                            f"{patch_size} px patch: CAM scales must keep every image at least one patch large")
    return views


def multiscale_cams(cam_fn: CamFn, image: Array, labels: Array, patch_size: int,
                    scales: Sequence[float] = (1.0, 1.2)) -> Array:
    """Summed refined CAMs (C, H, W) of one uint8 (H, W, 3) image over scales x {plain, flipped} (steps 1-2
    of the module docstring); `labels` (C,) multi-hot zeroes the absent classes."""
    height, width = image.shape[:2]
    labels = jnp.asarray(labels, jnp.float32)
    total = None
    for size in view_sizes((height, width), scales, patch_size):
        scaled = normalize(pil_resize(image, size).astype(jnp.float32) / 255)
        for flip in (False, True):
            view = scaled[:, ::-1] if flip else scaled
            cam, patch_attention = cam_fn(view[None])
            cam = (cam if patch_attention is None else refine(cam, patch_attention))[0]
            cam = resize(cam, (height, width), method="bilinear", axes=(1, 2)) * labels[:, None, None]
            cam = cam[:, :, ::-1] if flip else cam
            total = cam if total is None else total + cam
    return total


def normalize_cams(cams: Array, labels: Array, eps: float = 1e-8) -> Array:
    """Per-class min-max normalisation to [0, 1] of (C, H, W) CAMs, (x - min) / (max - min + eps); absent
    classes are 0. WeakTr's eps is 1e-8, AFA's 1e-5."""
    low = cams.min((1, 2), keepdims=True)
    high = cams.max((1, 2), keepdims=True)
    normalized = (cams - low) / (high - low + eps)
    return jnp.where(jnp.asarray(labels, bool)[:, None, None], normalized, 0.0)


def image_cams(cam_fn: CamFn, image: Array, labels: Array, patch_size: int,
               scales: Sequence[float] = (1.0, 1.2)) -> Array:
    """Steps 1-3 for one uint8 (H, W, 3) image: (C, H, W) CAMs, absent classes 0, present ones min-max
    normalised."""
    return normalize_cams(multiscale_cams(cam_fn, image, labels, patch_size, scales), labels)


def pseudo_label(normalized: Array, labels: Array, threshold: float) -> Array:
    """(H, W) int32 label map: 0 where no present class beats the background plane `threshold`, else the
    best present class c as c + 1."""
    present = jnp.asarray(labels, bool)[:, None, None]
    scores = jnp.where(present, normalized, -jnp.inf)
    background = jnp.full((1,) + normalized.shape[1:], threshold, normalized.dtype)
    return jnp.argmax(jnp.concatenate([background, scores]), axis=0).astype(jnp.int32)
