"""EoMT's training augmentation, its torchvision-v2 chain (reference `datasets/transforms.py`, as
docs/eomt.md "Augmentation" gives it; the order matters): crowd segments dropped, colour jitter, flip,
torchvision ScaleJitter, pad, random crop, empty masks dropped. The image stays uint8 (EoMT normalises
inside the model). Every random number is drawn from the supplied generator; the tests check image /
target alignment and that the generator alone determines the result.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from jaxseg.data.augment.common import pad_to, random_crop, random_hflip, resize
from jaxseg.errors import UserError


def scale_jitter(example: dict, rng: np.random.Generator, target_size: tuple[int, int],
                 scale_range: tuple[float, float]) -> dict:
    """torchvision ScaleJitter: factor min(target_h / H, target_w / W) * U(scale_range)."""
    height, width = example["image"].shape[:2]
    factor = min(target_size[0] / height, target_size[1] / width) * rng.uniform(*scale_range)
    return resize(example, (max(1, int(height * factor)), max(1, int(width * factor))))


def grayscale(image: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, as torchvision's rgb_to_grayscale.
    return image @ np.array([0.299, 0.587, 0.114])


def _blend(image: np.ndarray, other, ratio: float) -> np.ndarray:
    return np.clip(ratio * image + (1 - ratio) * other, 0, 255)


def _shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(round(shift * 255))) % 256
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float64)


def color_jitter(example: dict, rng: np.random.Generator, brightness_delta: float = 32 / 255,
                 contrast: tuple = (0.5, 1.5), saturation: tuple = (0.5, 1.5),
                 hue_delta: float = 18 / 360, p: float = 0.5) -> dict:
    """EoMT's photometric distortion: brightness (p), then contrast before or after saturation + hue
    (each p), factors as docs/eomt.md ("Augmentation") gives them. Only the image changes."""
    image = example["image"].astype(np.float64)
    if rng.random() < p:
        image = _blend(image, 0.0, rng.uniform(1 - brightness_delta, 1 + brightness_delta))

    def contrast_op(img):
        return _blend(img, grayscale(img).mean(), rng.uniform(*contrast)) if rng.random() < p else img

    def saturation_hue_op(img):
        if rng.random() < p:
            img = _blend(img, grayscale(img)[..., None], rng.uniform(*saturation))
        if rng.random() < p:
            img = _shift_hue(np.round(img), rng.uniform(-hue_delta, hue_delta))
        return img

    ops = (contrast_op, saturation_hue_op) if rng.random() < 0.5 else (saturation_hue_op, contrast_op)
    for op in ops:
        image = op(image)
    return dict(example, image=np.round(image).astype(np.uint8))


def mask_targets(semantic: np.ndarray | None = None, panoptic: np.ndarray | None = None,
                 segments: dict | None = None, *, max_segments: int, ignore_index: int = 255) -> dict:
    """Mask-classification targets padded to a static count: semantic labels give one mask per present
    class; panoptic ids with a segment table (columns "id", "category_id", "iscrowd" of equal length, as
    `jaxseg.data.synthetic` and the TFDS builders store it) give one per segment, crowd removed.
    Returns {"masks": (S, H, W) bool, "labels": (S,) int32, "valid": (S,) bool}; segments beyond
    `max_segments` are dropped (the largest are kept)."""
    if (semantic is None) == (panoptic is None):
        raise UserError("give exactly one of semantic labels or panoptic ids")
    if semantic is not None:
        classes = [c for c in np.unique(semantic) if c != ignore_index]
        masks = [semantic == c for c in classes]
        labels = classes
    else:
        if segments is None:
            raise UserError("panoptic ids need their segment table")
        ids = np.asarray(segments["id"])
        crowd = np.asarray(segments.get("iscrowd", np.zeros(len(ids), bool)), bool)
        masks = [panoptic == i for i in ids[~crowd]]
        labels = np.asarray(segments["category_id"])[~crowd].tolist()
    order = np.argsort([-m.sum() for m in masks], kind="stable")[:max_segments]
    height, width = (semantic if semantic is not None else panoptic).shape
    out_masks = np.zeros((max_segments, height, width), bool)
    out_labels = np.zeros(max_segments, np.int32)
    valid = np.zeros(max_segments, bool)
    for slot, index in enumerate(order):
        out_masks[slot], out_labels[slot], valid[slot] = masks[index], labels[index], masks[index].any()
    return {"masks": out_masks, "labels": out_labels, "valid": valid}


def eomt_train_example(example: dict, rng: np.random.Generator, crop_size: tuple[int, int],
                       scale_range: tuple[float, float], *, color: bool, max_segments: int,
                       segments: dict | None = None, max_attempts: int = 20) -> dict:
    """EoMT's training augmentation (in the order of docs/eomt.md, "Augmentation": crowd dropped, colour
    jitter, flip, scale jitter, pad, random crop, empty masks dropped, the whole transform redone from the
    original while no mask remains) -> {"image", "masks", "labels", "valid"} with static shapes. Targets come from the
    panoptic ids when a segment table is given, else from the semantic labels."""
    for _ in range(max_attempts):
        x = color_jitter(example, rng) if color else example
        x = random_hflip(x, rng)
        x = scale_jitter(x, rng, crop_size, scale_range)
        x = random_crop(pad_to(x, crop_size), rng, crop_size)
        if segments is None:
            targets = mask_targets(x["semantic"], max_segments=max_segments)
        else:
            targets = mask_targets(panoptic=x["panoptic"], segments=segments, max_segments=max_segments)
        if targets["valid"].any():
            return {"image": x["image"], **targets}
    raise UserError(f"no segment survived {max_attempts} augmentation attempts; is the example empty?")
