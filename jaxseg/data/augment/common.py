"""What the augmentation families share, on host numpy arrays, for grain `random_map`s.

An example is a dict with an "image" (H, W, 3) uint8 and any number of per-pixel targets listed in
`FILL_VALUES` (semantic labels, panoptic ids) or a "masks" (N, H, W) bool stack. Every random
parameter is drawn once from the supplied `np.random.Generator` and applied to every key, so image and
targets stay aligned, and the result depends only on the generator (grain derives it from the seed and
the element index, which makes augmentation independent of the number of workers).

Here: the per-pixel key helpers, flips, the PIL helpers, resize, padding, random crop and the ImageNet
normalisation in the float32 arithmetic of torchvision's ToTensor + Normalize (WeakTr's models take
normalised images; unlike EoMT, they do not normalise inside).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from jaxseg.errors import UserError
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD

# Value written where padding adds pixels: void / ignore for labels, 0 for ids, black for images.
FILL_VALUES = {"image": 0, "semantic": 255, "panoptic": 0, "masks": False}


def _spatial_keys(example: dict) -> list[str]:
    unknown = [k for k, v in example.items() if isinstance(v, np.ndarray) and v.ndim >= 2
               and k not in FILL_VALUES]
    if unknown:
        raise UserError(f"unknown per-pixel keys {unknown}; known: {sorted(FILL_VALUES)}")
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


def _on_pil_target(array: np.ndarray, fn) -> np.ndarray:
    """fn applied to a per-pixel target as a 32-bit integer PIL image, which holds labels, ids and masks
    exactly."""
    return np.asarray(fn(Image.fromarray(array.astype(np.int32, copy=False)))).astype(array.dtype)


def _pil_spatial(example: dict, fn, resample, fill=0) -> dict:
    """fn(pil_image, resample, fill) on every per-pixel array: the image with `resample` and `fill`,
    targets with nearest and their `FILL_VALUES`."""
    def one(array, key):
        if key == "image":
            return np.asarray(fn(Image.fromarray(array), resample, fill))
        return _on_pil_target(array, lambda im: fn(im, Image.NEAREST, int(FILL_VALUES[key])))
    return _map_spatial(example, one)


def _on_image(example: dict, fn) -> dict:
    """fn on the image as a PIL image; targets unchanged."""
    return dict(example, image=np.asarray(fn(Image.fromarray(example["image"]))))


def resize(example: dict, size: tuple[int, int]) -> dict:
    """Image bilinear with antialiasing (PIL), targets nearest, to size = (height, width)."""
    return _pil_spatial(example, lambda im, resample, _: im.resize(size[::-1], resample), Image.BILINEAR)


def pad_to(example: dict, size: tuple[int, int]) -> dict:
    """Pads bottom / right up to at least `size` with each key's fill value."""
    def one(array, key):
        extra = ((0, max(0, size[0] - array.shape[0])), (0, max(0, size[1] - array.shape[1])))
        return np.pad(array, extra + ((0, 0),) * (array.ndim - 2), constant_values=FILL_VALUES[key])
    return _map_spatial(example, one)


def random_crop(example: dict, rng: np.random.Generator, size: tuple[int, int]) -> dict:
    height, width = example["image"].shape[:2]
    if height < size[0] or width < size[1]:
        raise UserError(f"cannot crop {size} from a {height}x{width} example; pad first")
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    return _map_spatial(example, lambda a, _: a[top:top + size[0], left:left + size[1]].copy())


def normalize_image(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (x / 255 - mean) / std, in the float32 arithmetic of torchvision's
    ToTensor + Normalize."""
    scaled = image.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
