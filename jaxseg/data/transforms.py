"""Joint image / target augmentations on host numpy arrays, for grain `random_map`s.

An example is a dict with an "image" (H, W, 3) uint8 and any number of per-pixel targets listed in
`FILL_VALUES` (semantic labels, panoptic ids) or a "masks" (N, H, W) bool stack. Every random
parameter is drawn once from the supplied `np.random.Generator` and applied to every key, so image and
targets stay aligned, and the result depends only on the generator (grain derives it from the seed and
the element index, which makes augmentation independent of the number of workers).
"""
from __future__ import annotations


import numpy as np
from PIL import Image

# Value written where padding adds pixels: void / ignore for labels, 0 for ids, black for images.
FILL_VALUES = {"image": 0, "semantic": 255, "panoptic": 0, "masks": False}


def _spatial_keys(example: dict) -> list[str]:
    unknown = [k for k, v in example.items() if isinstance(v, np.ndarray) and v.ndim >= 2
               and k not in FILL_VALUES]
    if unknown:
        raise ValueError(f"unknown per-pixel keys {unknown}; known: {sorted(FILL_VALUES)}")
    return [k for k in FILL_VALUES if k in example]


def _map_spatial(example: dict, fn) -> dict:
    """Applies fn(array, key) to every per-pixel array; a mask stack (N, H, W) mask by mask."""
    out = dict(example)
    for key in _spatial_keys(example):
        value = example[key]
        if key != "masks":
            out[key] = fn(value, key)
            continue
        # An empty stack still needs the new spatial size: map one blank mask and keep none.
        frames = [fn(m, key) for m in value] or [fn(np.zeros(value.shape[1:], bool), key)]
        out[key] = np.stack(frames)[:len(value)]
    return out


def hflip(example: dict) -> dict:
    return _map_spatial(example, lambda a, _: a[:, ::-1].copy())


def random_hflip(example: dict, rng: np.random.Generator, p: float = 0.5) -> dict:
    return hflip(example) if rng.random() < p else example


def resize(example: dict, size: tuple[int, int]) -> dict:
    """Image bilinear with antialiasing (PIL), targets nearest, to size = (height, width)."""
    def one(array, key):
        if key == "image":
            return np.asarray(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))
        mode = array.dtype
        resized = Image.fromarray(array.astype(np.int32) if mode != np.int32 else array).resize(
            size[::-1], Image.NEAREST)
        return np.asarray(resized).astype(mode)
    return _map_spatial(example, one)


def scale_jitter(example: dict, rng: np.random.Generator, target_size: tuple[int, int],
                 scale_range: tuple[float, float]) -> dict:
    """torchvision ScaleJitter: factor min(target_h / H, target_w / W) * U(scale_range)."""
    height, width = example["image"].shape[:2]
    factor = min(target_size[0] / height, target_size[1] / width) * rng.uniform(*scale_range)
    return resize(example, (max(1, int(height * factor)), max(1, int(width * factor))))


def pad_to(example: dict, size: tuple[int, int]) -> dict:
    """Pads bottom / right up to at least `size` with each key's fill value."""
    def one(array, key):
        extra = ((0, max(0, size[0] - array.shape[0])), (0, max(0, size[1] - array.shape[1])))
        return np.pad(array, extra + ((0, 0),) * (array.ndim - 2), constant_values=FILL_VALUES[key])
    return _map_spatial(example, one)


def random_crop(example: dict, rng: np.random.Generator, size: tuple[int, int]) -> dict:
    height, width = example["image"].shape[:2]
    if height < size[0] or width < size[1]:
        raise ValueError(f"cannot crop {size} from a {height}x{width} example; pad first")
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    return _map_spatial(example, lambda a, _: a[top:top + size[0], left:left + size[1]].copy())


def _grayscale(image: np.ndarray) -> np.ndarray:
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
    (each p), factors as the spec gives them. Only the image changes."""
    image = example["image"].astype(np.float64)
    if rng.random() < p:
        image = _blend(image, 0.0, rng.uniform(1 - brightness_delta, 1 + brightness_delta))

    def contrast_op(img):
        return _blend(img, _grayscale(img).mean(), rng.uniform(*contrast)) if rng.random() < p else img

    def saturation_hue_op(img):
        if rng.random() < p:
            img = _blend(img, _grayscale(img)[..., None], rng.uniform(*saturation))
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
        raise ValueError("give exactly one of semantic labels or panoptic ids")
    if semantic is not None:
        classes = [c for c in np.unique(semantic) if c != ignore_index]
        masks = [semantic == c for c in classes]
        labels = classes
    else:
        if segments is None:
            raise ValueError("panoptic ids need their segment table")
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
    """EoMT's training augmentation (spec order: crowd dropped, colour jitter, flip, scale jitter, pad,
    random crop, empty masks dropped, the whole transform redone from the original while no mask
    remains) -> {"image", "masks", "labels", "valid"} with static shapes. Targets come from the
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
    raise ValueError(f"no segment survived {max_attempts} augmentation attempts; is the example empty?")
