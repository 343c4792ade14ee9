"""Joint image / target augmentations on host numpy arrays, for grain `random_map`s.

An example is a dict with an "image" (H, W, 3) uint8 and any number of per-pixel targets listed in
`FILL_VALUES` (semantic labels, panoptic ids) or a "masks" (N, H, W) bool stack. Every random
parameter is drawn once from the supplied `np.random.Generator` and applied to every key, so image and
targets stay aligned, and the result depends only on the generator (grain derives it from the seed and
the element index, which makes augmentation independent of the number of workers).

Besides EoMT's chain, the module holds WeakTr's two recipes:
  - stage 1 (`weaktr_stage1_example`): timm's `create_transform` for DeiT training, i.e. random resized
    crop, flip, RandAugment "rand-m9-mstd0.5-inc1", ImageNet normalisation and random erasing;
  - stage 2 (`weaktr_stage2_example`): the mmseg 0.x pipeline of WeakTr's online retraining, i.e. ratio
    rescale, random crop with a category cap, flip, photometric distortion, normalisation and padding.
Where the reference draws its random numbers in a documented order, the functions here draw theirs in
the same order and from the same distributions, so a reference whose `random` calls are routed to the
same generator gives identical outputs (the tests do this against timm). WeakTr's models take
normalised images (unlike EoMT, they do not normalise inside), so both recipes return float32 images
normalised with the ImageNet mean / std.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD

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
    (each p), factors as docs/eomt.md ("Augmentation") gives them. Only the image changes."""
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
    raise ValueError(f"no segment survived {max_attempts} augmentation attempts; is the example empty?")


def normalize_image(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (x / 255 - mean) / std, in the float32 arithmetic of torchvision's
    ToTensor + Normalize."""
    scaled = image.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# --- WeakTr stage 1: timm's create_transform(224, auto_augment="rand-m9-mstd0.5-inc1",
# interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1), on images with image-level labels.

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
        raise ValueError(f"augmentation must be one of {STAGE1_AUGMENTATIONS}, got {augmentation!r}")
    x = {"image": example["image"]}
    if augmentation == "flip":
        x = random_hflip(resize(x, (size, size)), rng)
        return {"image": normalize_image(x["image"]), "labels": example["labels"]}
    x = random_resized_crop(x, rng, (size, size))
    x = random_hflip(x, rng)
    x = rand_augment(x, rng)
    x = random_erasing({"image": normalize_image(x["image"])}, rng)
    return {"image": x["image"], "labels": example["labels"]}


# --- WeakTr stage 2: mmseg 0.x Resize(ratio_range) -> RandomCrop(cat_max_ratio) -> RandomFlip ->
# PhotoMetricDistortion -> Normalize -> Pad, on images with dense pseudo labels ("semantic").

def _cv2_linear_taps(size: int, new: int, clamp_weights: bool):
    """OpenCV INTER_LINEAR taps along one axis for 8-bit images: source x = (i + 0.5) * size / new - 0.5
    in float32, its two neighbours (clipped to the image) and their weights in 11-bit fixed point.
    OpenCV moves a tap outside the image onto the edge pixel with full weight along x but keeps the
    weights along y (both taps then read the edge row)."""
    src = ((np.arange(new) + 0.5) * (1.0 / (new / size)) - 0.5).astype(np.float32)
    low = np.floor(src)
    frac = src - low
    low = low.astype(np.int64)
    if clamp_weights:
        frac[(low < 0) | (low >= size - 1)] = 0
    weights = (np.rint((1 - frac) * np.float32(2048)), np.rint(frac * np.float32(2048)))
    return np.clip(low, 0, size - 1), np.clip(low + 1, 0, size - 1), *(w.astype(np.int64) for w in weights)


def _cv2_nearest_index(size: int, new: int) -> np.ndarray:
    # OpenCV INTER_NEAREST takes source floor(i * size / new): top-left aligned, not pixel-centred.
    return np.minimum(np.floor(np.arange(new) * (1.0 / (new / size))).astype(np.int64), size - 1)


def mmcv_resize(example: dict, size: tuple[int, int]) -> dict:
    """mmcv.imresize (cv2 backend) to size = (height, width): image cv2 INTER_LINEAR (no antialiasing) in
    OpenCV's 8-bit fixed-point arithmetic (that of its vectorised vertical pass), targets cv2
    INTER_NEAREST."""
    def one(array, key):
        if key != "image":
            rows, cols = (_cv2_nearest_index(n, new) for n, new in zip(array.shape[:2], size))
            return array[rows][:, cols]
        left, right, wl, wr = _cv2_linear_taps(array.shape[1], size[1], clamp_weights=True)
        pixels = array.astype(np.int64)
        rows = pixels[:, left] * wl[:, None] + pixels[:, right] * wr[:, None]
        top, bottom, wt, wb = _cv2_linear_taps(array.shape[0], size[0], clamp_weights=False)
        out = ((rows[top] >> 4) * wt[:, None, None] >> 16) + ((rows[bottom] >> 4) * wb[:, None, None] >> 16)
        return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    return _map_spatial(example, one)


def ratio_rescale(example: dict, rng: np.random.Generator, img_scale: tuple[int, int] = (8 * 520, 520),
                  ratio_range: tuple[float, float] = (0.5, 2.0)) -> dict:
    """mmseg Resize(img_scale, ratio_range, keep_ratio=True).

    mmseg draws r = U(ratio_range) and scales the bounds to (int(img_scale[0] r), int(img_scale[1] r));
    mmcv.imrescale then takes the largest aspect-keeping factor under which the long side stays within
    the larger bound and the short side within the smaller one,
    f = min(max(bounds) / long side, min(bounds) / short side), and resizes each side to
    int(side f + 0.5). With WeakTr's (8 * 520, 520) the long-side bound only binds for images more than 8
    times longer than wide, so the short side becomes int(520 r) (up to that rounding)."""
    height, width = example["image"].shape[:2]
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    bounds = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    factor = min(max(bounds) / max(height, width), min(bounds) / min(height, width))
    return mmcv_resize(example, (int(height * factor + 0.5), int(width * factor + 0.5)))


def random_crop_cat_max(example: dict, rng: np.random.Generator, size: tuple[int, int],
                        cat_max_ratio: float = 0.75, ignore_index: int = 255, retries: int = 10) -> dict:
    """mmseg RandomCrop: a box of `size` (height, width) at a uniform offset (clipped to the image, so
    smaller images give smaller crops: pad afterwards). With cat_max_ratio < 1 the box is redrawn, up to
    `retries` times, while the "semantic" labels in it (ignore_index not counted) hold fewer than two
    classes or one class covers cat_max_ratio or more; after the last retry the newest box is kept."""
    height, width = example["image"].shape[:2]

    def draw():
        top = int(rng.integers(0, max(height - size[0], 0) + 1))
        left = int(rng.integers(0, max(width - size[1], 0) + 1))
        return slice(top, top + size[0]), slice(left, left + size[1])

    box = draw()
    if cat_max_ratio < 1:
        for _ in range(retries):
            labels, counts = np.unique(example["semantic"][box], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return _map_spatial(example, lambda a, _: a[box].copy())


# OpenCV's 8-bit RGB -> HSV reciprocal tables (12-bit fixed point, hue range 180).
_DIVISORS = np.arange(1, 256, dtype=np.float64)
_SAT_DIV = np.concatenate([[0], np.rint((255 << 12) / _DIVISORS)]).astype(np.int64)
_HUE_DIV = np.concatenate([[0], np.rint((180 << 12) / (6 * _DIVISORS))]).astype(np.int64)
# For each hue sector, which of (v, p, q, t) becomes r, g and b in OpenCV's HSV -> RGB.
_HSV_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def _cv2_rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_RGB2HSV) on uint8: H in [0, 180) (degrees / 2), S and V in [0, 255], with
    OpenCV's integer arithmetic."""
    r, g, b = np.moveaxis(rgb.astype(np.int64), -1, 0)
    v, diff = rgb.max(-1).astype(np.int64), np.ptp(rgb, -1).astype(np.int64)
    s = (diff * _SAT_DIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HUE_DIV[diff] + (1 << 11)) >> 12
    return np.stack([np.where(h < 0, h + 180, h), s, v], -1).astype(np.uint8)


def _cv2_hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_HSV2RGB) on uint8 as OpenCV's vectorised x86 path (AVX2 with FMA) computes it:
    float32 arithmetic with 1 - s * x fused, truncated to uint8. (Its scalar tail, the last width mod 32
    pixels of a row, rounds instead, so there OpenCV may give one grey level more.)"""
    h, s, v = np.moveaxis(hsv.astype(np.float32), -1, 0)
    h = h * (np.float32(6) / np.float32(180))
    s, v = s * (np.float32(1) / np.float32(255)), v * (np.float32(1) / np.float32(255))
    sector = np.floor(h)
    h = h - sector

    def fused_one_minus_s_times(x):
        # float32 s * x is exact in float64: one rounding, as a fused multiply-add.
        return (1 - s.astype(np.float64) * x).astype(np.float32)

    tab = np.stack([v, v * (1 - s), v * fused_one_minus_s_times(h), v * fused_one_minus_s_times(1 - h)], -1)
    rgb = np.take_along_axis(tab, _HSV_SECTOR_RGB[sector.astype(np.int64) % 6], -1)
    return np.clip(rgb * np.float32(255), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's `convert`: float32 multiply-add (NumPy 1.x kept float32 for float64 scalars), clip, truncate.
    return np.clip(values.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photometric_distortion(example: dict, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> dict:
    """mmseg PhotoMetricDistortion on the uint8 image; each step happens when an integer draw in {0, 1}
    is 1 (p = 0.5), in mmseg's order:
      1. brightness: + U(-brightness_delta, brightness_delta);
      2. a mode draw: contrast (x U(contrast_range)) here when it is 1, else after step 4;
      3. saturation: the HSV S channel x U(saturation_range);
      4. hue: H + an integer in [-hue_delta, hue_delta) (numpy's randint excludes the high end), modulo
         180, in OpenCV's half-degree units (so up to 36 degrees).
    Steps 3 and 4 each go through their own OpenCV HSV round trip; every step clips and truncates to
    uint8. Targets are unchanged."""
    image = example["image"]

    def contrast(img):
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = _cv2_rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = _cv2_hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _cv2_rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        image = _cv2_hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return dict(example, image=image)


def weaktr_stage2_example(example: dict, rng: np.random.Generator, crop: int = 480, base: int = 520, *,
                          ratio_range: tuple[float, float] = (0.5, 2.0), photometric: bool = True) -> dict:
    """WeakTr's stage-2 training augmentation of {"image": (H, W, 3) uint8, "semantic": (H, W) pseudo
    labels} in mmseg's order: ratio rescale (short side ~ base x U(ratio_range)), random crop with
    cat_max_ratio 0.75, flip, photometric distortion (unless `photometric` is False), normalisation,
    padding (image 0, labels 255) -> {"image": (crop, crop, 3) float32 normalised, "semantic": (crop,
    crop)}. The defaults are the recipe's; milder settings suit small models trained from scratch.

    Normalisation uses the exact ImageNet constants; WeakTr passes mmseg 255 x mean / std rounded to two
    decimals, a difference below 1e-4 in the normalised values."""
    x = {"image": example["image"], "semantic": example["semantic"]}
    x = ratio_rescale(x, rng, img_scale=(8 * base, base), ratio_range=ratio_range)
    x = random_crop_cat_max(x, rng, (crop, crop))
    x = random_hflip(x, rng)
    if photometric:
        x = photometric_distortion(x, rng)
    return pad_to(dict(x, image=normalize_image(x["image"])), (crop, crop))
