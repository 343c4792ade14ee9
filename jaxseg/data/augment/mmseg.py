"""WeakTr stage 2 (`weaktr_stage2_example`): the mmseg 0.x pipeline of WeakTr's online retraining,
Resize(ratio_range) -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> Normalize ->
Pad, on images with dense pseudo labels ("semantic"), with mmcv's cv2 backend reproduced in numpy
(OpenCV's fixed-point INTER_LINEAR / INTER_NEAREST resize and its 8-bit HSV conversions; the tests
compare these with known answers from OpenCV). The result is a float32 image normalised with the
ImageNet mean / std.
"""
from __future__ import annotations

import numpy as np

from jaxseg.data.augment.common import _map_spatial, normalize_image, pad_to, random_hflip
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD


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
                          ratio_range: tuple[float, float] = (0.5, 2.0), photometric: bool = True,
                          pixel_stats: tuple = (IMAGENET_MEAN, IMAGENET_STD)) -> dict:
    """WeakTr's stage-2 training augmentation of {"image": (H, W, 3) uint8, "semantic": (H, W) pseudo
    labels} in mmseg's order: ratio rescale (short side ~ base x U(ratio_range)), random crop with
    cat_max_ratio 0.75, flip, photometric distortion (unless `photometric` is False), normalisation,
    padding (image 0, labels 255) -> {"image": (crop, crop, 3) float32 normalised, "semantic": (crop,
    crop)}. The defaults are the recipe's; milder settings suit small models trained from scratch.

    Normalisation uses the exact (mean, std) of `pixel_stats` (ImageNet's by default); WeakTr passes mmseg
    255 x mean / std rounded to two decimals, a difference below 1e-4 in the normalised values."""
    x = {"image": example["image"], "semantic": example["semantic"]}
    x = ratio_rescale(x, rng, img_scale=(8 * base, base), ratio_range=ratio_range)
    x = random_crop_cat_max(x, rng, (crop, crop))
    x = random_hflip(x, rng)
    if photometric:
        x = photometric_distortion(x, rng)
    return pad_to(dict(x, image=normalize_image(x["image"], *pixel_stats)), (crop, crop))
