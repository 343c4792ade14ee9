"""WeakTr stage 1 (`weaktr_stage1_example`): timm's `create_transform` for DeiT training,
create_transform(224, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
re_mode="pixel", re_count=1), on images with image-level labels, i.e. random resized crop, flip,
RandAugment "rand-m9-mstd0.5-inc1", ImageNet normalisation and random erasing.

Where timm draws its random numbers in a documented order, the functions here draw theirs in the same
order and from the same distributions, so timm with its `random` calls routed to the same generator
gives identical outputs (the tests do this against timm). The result is a float32 image normalised with
the ImageNet mean / std.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxseg.data.augment.common import _on_image, _pil_spatial, normalize_image, random_hflip, resize
from jaxseg.errors import UserError
from jaxseg.ops.image import IMAGENET_MEAN


def _resized_crop_box(height: int, width: int, rng: np.random.Generator, scale, ratio,
                      attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) as timm's RandomResizedCropAndInterpolation.get_params (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # No attempt fitted: a centre crop of the whole image, its aspect ratio clamped into `ratio`.
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(example: dict, rng: np.random.Generator, size: tuple[int, int] = (224, 224),
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> dict:
    """torchvision RandomResizedCrop: a box of area fraction U(scale) and log-uniform aspect ratio (10
    attempts, then a centre crop), resized to size = (height, width); image bicubic (PIL, as torchvision
    on PIL images), targets nearest."""
    height, width = example["image"].shape[:2]
    top, left, h, w = _resized_crop_box(height, width, rng, scale, ratio)
    box = (left, top, left + w, top + h)
    return _pil_spatial(example, lambda im, resample, _: im.crop(box).resize(size[::-1], resample),
                        Image.BICUBIC)


# timm fills the pixels that geometric ops uncover with its `img_mean`, round(255 * ImageNet mean).
RAND_AUGMENT_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def _signed(value: float, rng: np.random.Generator) -> float:
    # timm's _randomly_negate: one draw, negative when it exceeds 0.5.
    return -value if rng.random() > 0.5 else value


def _warp(example: dict, fn) -> dict:
    """A RandAugment geometric op on every per-pixel array: image bicubic with the timm fill."""
    return _pil_spatial(example, fn, Image.BICUBIC, RAND_AUGMENT_FILL)


def _affine(example: dict, matrix: tuple) -> dict:
    return _warp(example, lambda im, resample, fill: im.transform(
        im.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill))


def _enhance(example: dict, enhancer, magnitude: float, rng: np.random.Generator) -> dict:
    # The "increasing" enhance level: the factor moves away from 1 (no change) as magnitude grows.
    factor = max(0.1, 1.0 + _signed(magnitude / 10 * 0.9, rng))
    return _on_image(example, lambda im: enhancer(im).enhance(factor))


def _rotate(example: dict, magnitude: float, rng: np.random.Generator) -> dict:
    degrees = _signed(magnitude / 10 * 30, rng)
    return _warp(example, lambda im, resample, fill: im.rotate(degrees, resample=resample, fillcolor=fill))


def _shear(example: dict, magnitude: float, rng: np.random.Generator, axis: int) -> dict:
    factor = _signed(magnitude / 10 * 0.3, rng)
    return _affine(example, (1, factor, 0, 0, 1, 0) if axis == 1 else (1, 0, 0, factor, 1, 0))


def _translate(example: dict, magnitude: float, rng: np.random.Generator, axis: int) -> dict:
    # timm's relative translation: up to 45% of the image width (axis 1) or height (axis 0).
    pixels = _signed(magnitude / 10 * 0.45, rng) * example["image"].shape[axis]
    return _affine(example, (1, 0, pixels, 0, 1, 0) if axis == 1 else (1, 0, 0, 0, 1, pixels))


def _solarize_add(image: np.ndarray, add: int, threshold: int = 128) -> np.ndarray:
    return np.where(image < threshold, np.minimum(image.astype(np.int32) + add, 255), image).astype(np.uint8)


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    # timm reaches 0 bits at magnitude 10; the PIL it was written for kept no bit (a black image), Pillow
    # 13 rejects 0.
    return ImageOps.posterize(image, bits) if bits > 0 else Image.new(image.mode, image.size)


# timm's _RAND_INCREASING_TRANSFORMS in its order (the op index is drawn over this order), each as
# op(example, magnitude in [0, 10], rng) with timm's increasing level-to-argument mappings. Geometric ops
# move every per-pixel target with the image; the others change only the image.
_RAND_AUGMENT = {
    "AutoContrast": lambda x, m, rng: _on_image(x, ImageOps.autocontrast),
    "Equalize": lambda x, m, rng: _on_image(x, ImageOps.equalize),
    "Invert": lambda x, m, rng: _on_image(x, ImageOps.invert),
    "Rotate": _rotate,
    "PosterizeIncreasing": lambda x, m, rng: _on_image(
        x, lambda im: _posterize(im, 4 - int(m / 10 * 4))),
    "SolarizeIncreasing": lambda x, m, rng: _on_image(
        x, lambda im: ImageOps.solarize(im, 256 - min(256, int(m / 10 * 256)))),
    "SolarizeAdd": lambda x, m, rng: dict(x, image=_solarize_add(x["image"], min(128, int(m / 10 * 110)))),
    "ColorIncreasing": lambda x, m, rng: _enhance(x, ImageEnhance.Color, m, rng),
    "ContrastIncreasing": lambda x, m, rng: _enhance(x, ImageEnhance.Contrast, m, rng),
    "BrightnessIncreasing": lambda x, m, rng: _enhance(x, ImageEnhance.Brightness, m, rng),
    "SharpnessIncreasing": lambda x, m, rng: _enhance(x, ImageEnhance.Sharpness, m, rng),
    "ShearX": lambda x, m, rng: _shear(x, m, rng, axis=1),
    "ShearY": lambda x, m, rng: _shear(x, m, rng, axis=0),
    "TranslateXRel": lambda x, m, rng: _translate(x, m, rng, axis=1),
    "TranslateYRel": lambda x, m, rng: _translate(x, m, rng, axis=0),
}
RAND_AUGMENT_OPS = tuple(_RAND_AUGMENT)


def rand_augment_op(example: dict, name: str, magnitude: float, rng: np.random.Generator) -> dict:
    """One of `RAND_AUGMENT_OPS` at a magnitude in [0, 10]; signed ops draw their sign from rng."""
    return _RAND_AUGMENT[name](example, magnitude, rng)


def rand_augment(example: dict, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, p: float = 0.5) -> dict:
    """timm RandAugment "rand-m9-mstd0.5-inc1": `num_ops` ops drawn with replacement, each applied with
    probability p at magnitude N(9, 0.5) clipped to [0, 10]."""
    for index in rng.integers(0, len(RAND_AUGMENT_OPS), size=num_ops):
        if rng.random() > p:
            continue
        level = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, 10.0))
        example = rand_augment_op(example, RAND_AUGMENT_OPS[index], level, rng)
    return example


def random_erasing(example: dict, rng: np.random.Generator, p: float = 0.25,
                   scale: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3,
                   attempts: int = 10) -> dict:
    """timm RandomErasing, mode "pixel", one region: with probability p, a box of area fraction U(scale)
    and log-uniform aspect ratio in [min_aspect, 1 / min_aspect] (up to 10 attempts to fit strictly
    inside) is replaced by N(0, 1) noise per pixel and channel. Meant for the normalised float image,
    where that noise is image-like; targets are unchanged."""
    if rng.random() > p:
        return example
    image = example["image"]
    height, width, channels = image.shape
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            erased = image.copy()
            # Drawn channel-first, the layout of the tensor timm fills.
            noise = rng.standard_normal((channels, h, w), dtype=np.float32)
            erased[top:top + h, left:left + w] = noise.transpose(1, 2, 0)
            return dict(example, image=erased)
    return example


STAGE1_AUGMENTATIONS = ("timm", "flip")


def weaktr_stage1_example(example: dict, rng: np.random.Generator, size: int = 224,
                          augmentation: str = "timm") -> dict:
    """WeakTr's stage-1 training augmentation of {"image": (H, W, 3) uint8, "labels": image-level labels}
    -> {"image": (size, size, 3) float32 normalised, "labels"}. "timm": the recipe, in timm's order:
    random resized crop, flip, RandAugment, normalisation, random erasing. "flip": resize to size x size,
    flip, normalisation, for images whose labels hold for small crops no more (a random resized crop
    keeps as little as 8 % of the image, while the labels still name every object in the whole image)."""
    if augmentation not in STAGE1_AUGMENTATIONS:
        raise UserError(f"augmentation must be one of {STAGE1_AUGMENTATIONS}, got {augmentation!r}")
    x = {"image": example["image"]}
    if augmentation == "flip":
        x = random_hflip(resize(x, (size, size)), rng)
        return {"image": normalize_image(x["image"]), "labels": example["labels"]}
    x = random_resized_crop(x, rng, (size, size))
    x = random_hflip(x, rng)
    x = rand_augment(x, rng)
    x = random_erasing({"image": normalize_image(x["image"])}, rng)
    return {"image": x["image"], "labels": example["labels"]}
