"""Synthetic scenes: jaxseg's built-in segmentation benchmark, pure numpy and deterministic.

A scene is a background of "stuff" regions (large smooth areas from low-frequency noise, each class
with its own texture) with "thing" objects pasted on top (countable instances, one silhouette and one
texture per class) at random scale, rotation, position and count, occluding each other. By default colour
does not identify a class: every class draws its colours from a wide hue range that overlaps the others',
so a model has to use shape and texture; a small `hue_spread` (with saturated colours) makes colour a cue,
the easier variant that weakly supervised training from scratch needs on a CPU budget. Pixels are
processed as whole arrays (Python loops run over objects and stuff classes only), and a scene is a
function of `(config.seed, index)` alone: bit for bit on a given numpy build and CPU; elsewhere float
rounding may move a few boundary pixels, which is one reason to build the dataset once
(`jaxseg.data.builders.scenes`) and share the files.

Conventions for a scene of S x S pixels with T thing and U stuff classes (K = T + U categories):
  category ids: things 0..T-1 (in `THING_SHAPES` order), then stuff T..K-1 (in `STUFF_TEXTURES`
    order), as COCO panoptic orders them. There is no background class: every pixel belongs to a
    stuff region or to an object (for VOC-style WSSS, treat the stuff classes as background).
  ignore border: pixels within `ignore_border` pixels (Chebyshev distance) of a pixel of another
    segment. Object edges are antialiased, so these pixels mix two classes; they are 255 in `semantic`
    and void (0) in `panoptic`, the only void there is. Stuff/stuff boundaries get the border too.
  panoptic: (S, S) int32 segment ids, 0 = void, id i = row i - 1 of the segment table: first one
    segment per present stuff class (the regions of a class are merged, as in COCO panoptic), by
    category, then the objects in painting order (back to front). A thing's id is its instance id.
  segments: the segment table, one entry per segment with at least one pixel, as a dict of (n,) arrays
    (the columns that TFDS's `Sequence` feature reads back as lists): "id" int32, "category_id"
    int32, "is_thing" bool, "iscrowd" bool (kept for COCO compatibility; the generator makes no crowd
    segments), "area" int32 (pixels in `panoptic`), "bbox" (n, 4) int32 COCO [x, y, width, height] of
    those pixels.
  labels: (K,) uint8 multi-hot image-level labels: 1 for every category with a segment (things and
    stuff alike, exactly the categories of the segment table).

An object that ends up less than `min_visible_fraction` visible (occluded or outside the image) is
left out of the scene entirely, so that every labelled instance shows enough of its shape.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxseg.errors import UserError

THING_SHAPES = ("disc", "triangle", "star", "cross", "ring", "crescent", "square", "capsule")
# Each stuff class is named after its texture.
STUFF_TEXTURES = ("clouds", "water", "grass", "bricks", "marble")
# Texture (pattern, period as a fraction of the image size) of each thing class, in THING_SHAPES order.
# Two classes may share a pattern at different frequencies (disc and capsule: stripes).
THING_TEXTURES = (("stripes", 0.07), ("checker", 0.10), ("dots", 0.09), ("rings", 0.06),
                  ("noise", 0.035), ("grid", 0.10), ("zigzag", 0.08), ("stripes", 0.13))
# Texture period of each stuff class, as a fraction of the image size.
STUFF_PERIODS = (0.35, 0.10, 0.04, 0.12, 0.12)

# Value range of every segment's colour, for all classes.
_VALUE = (0.35, 1.0)
_PIXEL_NOISE = 4.0  # std of the Gaussian pixel noise, in 8-bit levels


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Parameters of the scene generator; every (config, index) pair gives one fixed scene.

    Attributes:
      image_size: S, the side of the square images in pixels (>= 16).
      num_thing_classes: T in 1..8: the first T of `THING_SHAPES`.
      num_stuff_classes: U in 1..5: the first U of `STUFF_TEXTURES`.
      objects_per_image: inclusive (min, max) number of objects drawn per scene, before the ones that
        end up hidden are left out.
      stuff_per_image: inclusive (min, max) number of stuff classes sharing the background (>= 1,
        max <= U).
      scale_range: object radius as a fraction of S, drawn uniformly.
      rotation_range: object rotation in degrees, drawn uniformly.
      min_visible_fraction: objects with a smaller visible part of their in-image area are left out.
      ignore_border: width in pixels of the ignore band on each side of a segment boundary (0: none).
      hue_spread: a segment's hue is drawn uniformly within this distance (in [0, 0.5], turns of the
        colour wheel) of its class's hue; at the default 0.3 each hue is shared by about 0.6 K classes,
        below about 0.5 / K the classes' hues no longer overlap.
      saturation_range: inclusive (min, max) saturation of a segment's colour, in [0, 1].
      seed: dataset seed (>= 0); scene `index` uses `np.random.default_rng([seed, index])`.
    """
    image_size: int = 128
    num_thing_classes: int = 6
    num_stuff_classes: int = 3
    objects_per_image: tuple[int, int] = (1, 6)
    stuff_per_image: tuple[int, int] = (1, 3)
    scale_range: tuple[float, float] = (0.1, 0.25)
    rotation_range: tuple[float, float] = (0.0, 360.0)
    min_visible_fraction: float = 0.3
    ignore_border: int = 1
    hue_spread: float = 0.3
    saturation_range: tuple[float, float] = (0.2, 0.9)
    seed: int = 0

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise UserError(f"SceneConfig: {message}")

        def is_int(value) -> bool:  # Python ints only: the config must serialise to JSON
            return isinstance(value, int) and not isinstance(value, bool)

        def check_range(name: str, low=None, high=None, integer=False):
            pair = getattr(self, name)
            ok = (isinstance(pair, (tuple, list)) and len(pair) == 2
                  and all(is_int(v) if integer else isinstance(v, (int, float)) for v in pair)
                  and pair[0] <= pair[1] and (low is None or pair[0] >= low)
                  and (high is None or pair[1] <= high))
            check(ok, f"{name} must be a (min, max) pair" + (" of integers" if integer else "")
                  + " with min <= max" + (f", min >= {low}" if low is not None else "")
                  + (f", max <= {high}" if high is not None else "") + f"; got {pair!r}")
            object.__setattr__(self, name, tuple(pair))  # lists (e.g. from JSON) become tuples

        check(is_int(self.image_size) and self.image_size >= 16,
              f"image_size must be an integer >= 16, got {self.image_size!r}")
        check(is_int(self.num_thing_classes) and 1 <= self.num_thing_classes <= len(THING_SHAPES),
              f"num_thing_classes must be an integer in 1..{len(THING_SHAPES)}, "
              f"got {self.num_thing_classes!r}")
        check(is_int(self.num_stuff_classes) and 1 <= self.num_stuff_classes <= len(STUFF_TEXTURES),
              f"num_stuff_classes must be an integer in 1..{len(STUFF_TEXTURES)}, "
              f"got {self.num_stuff_classes!r}")
        check_range("objects_per_image", low=0, integer=True)
        check_range("stuff_per_image", low=1, high=self.num_stuff_classes, integer=True)
        check_range("scale_range", high=1.0)
        check(self.scale_range[0] > 0, f"scale_range must be positive, got {self.scale_range!r}")
        check_range("rotation_range")
        check(isinstance(self.min_visible_fraction, (int, float)) and 0 <= self.min_visible_fraction <= 1,
              f"min_visible_fraction must be in [0, 1], got {self.min_visible_fraction!r}")
        check(is_int(self.ignore_border) and self.ignore_border >= 0,
              f"ignore_border must be an integer >= 0, got {self.ignore_border!r}")
        check(isinstance(self.hue_spread, (int, float)) and 0 <= self.hue_spread <= 0.5,
              f"hue_spread must be in [0, 0.5], got {self.hue_spread!r}")
        check_range("saturation_range", low=0, high=1)
        check(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def num_classes(self) -> int:
        return self.num_thing_classes + self.num_stuff_classes


def categories(config: SceneConfig) -> list[dict]:
    """COCO-panoptic-style category table: [{"id", "name", "isthing"}] for ids 0..K-1."""
    things = [{"id": c, "name": THING_SHAPES[c], "isthing": True}
              for c in range(config.num_thing_classes)]
    stuff = [{"id": config.num_thing_classes + c, "name": STUFF_TEXTURES[c], "isthing": False}
             for c in range(config.num_stuff_classes)]
    return things + stuff


# ---------------------------------------------------------------------------------------------------
# Textures: functions of pixel coordinates (u, v) in the texture's own frame, values in [0, 1].

def _value_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Smooth random field in [0, 1]: random values on a lattice of `period` pixels, interpolated."""
    x, y = u / period, v / period
    x0, y0 = np.floor(x), np.floor(y)
    # Smoothstep weights: plain bilinear interpolation leaves visible creases along the lattice.
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = (x0 - x0.min()).astype(np.intp), (y0 - y0.min()).astype(np.intp)
    table = rng.random((iy.max() + 2, ix.max() + 2), dtype=np.float32)
    top = table[iy, ix] * (1 - fx) + table[iy, ix + 1] * fx
    bottom = table[iy + 1, ix] * (1 - fx) + table[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _smooth_fields(rng: np.random.Generator, count: int, size: int, period: float) -> np.ndarray:
    """(count, size, size) value noise over the pixel grid, as `_value_noise` but separable: on an
    axis-aligned grid the interpolation is a (size, m) weight matrix applied on both sides."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / period + rng.random()
    cell = np.floor(x).astype(np.intp)
    f = x - cell
    f = f * f * (3 - 2 * f)
    weights = np.zeros((size, cell[-1] + 2), np.float32)
    weights[np.arange(size), cell] = 1 - f
    weights[np.arange(size), cell + 1] = f
    table = rng.random((count,) + (weights.shape[1],) * 2, dtype=np.float32)
    return weights @ table @ weights.T


def _wave(phase: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.sin(2 * np.pi * phase)


def _lattice_distance(x: np.ndarray) -> np.ndarray:
    """Distance to the nearest integer, in [0, 0.5]."""
    return np.abs(x - np.round(x))


def _texture(pattern: str, u, v, period: float, rng: np.random.Generator) -> np.ndarray:
    """Pattern value in [0, 1] at (u, v) (pixels, texture frame; "rings" centre on the origin)."""
    x, y = u / period, v / period
    if pattern == "stripes":
        return _wave(x)
    if pattern == "checker":
        return np.clip(0.5 + 2 * np.sin(2 * np.pi * x) * np.sin(2 * np.pi * y), 0, 1)
    if pattern == "dots":  # antialiased discs of radius 0.3 period on a square lattice
        distance = np.hypot(_lattice_distance(x), _lattice_distance(y)) * period
        return np.clip(0.3 * period - distance + 0.5, 0, 1)
    if pattern == "rings":
        return _wave(np.hypot(x, y))
    if pattern == "noise":
        return _value_noise(rng, u, v, period)
    if pattern == "grid":  # lines about 2 pixels wide
        distance = np.minimum(_lattice_distance(x), _lattice_distance(y)) * period
        return np.clip(1.5 - distance, 0, 1)
    if pattern == "zigzag":
        return _wave(x + np.abs((y % 1) - 0.5))
    if pattern == "clouds":  # two octaves
        return 0.65 * _value_noise(rng, u, v, period) + 0.35 * _value_noise(rng, u, v, period / 3)
    if pattern == "water":
        return _wave(x + 0.4 * np.sin(np.pi * y))
    if pattern == "grass":  # noise stretched 6x along v: blades
        return _value_noise(rng, u, v / 6, period)
    if pattern == "bricks":  # dark mortar lines between rows offset by half a brick
        row = np.floor(2 * y)
        mortar = np.minimum(_lattice_distance(x + 0.5 * (row % 2)) * period,
                            _lattice_distance(2 * y) * period / 2)
        return np.clip(mortar - 0.5, 0, 1)
    if pattern == "marble":
        return _wave(x + 1.5 * _value_noise(rng, u, v, 3 * period))
    raise UserError(f"unknown texture pattern {pattern!r}")


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV -> RGB for values in [0, 1] (hue wraps); returns (..., 3)."""
    h = (np.asarray(h) % 1.0) * 6
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None]) % 6
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _draw_colours(rng: np.random.Generator, config: SceneConfig,
                  hue_centre: float) -> tuple[np.ndarray, np.ndarray]:
    """Base and pattern colour (3,) in [0, 255] of one segment: the pattern colour is a darker, slightly
    hue-shifted version of the base, so textures show mostly as luminance, with random contrast."""
    hue = hue_centre + rng.uniform(-config.hue_spread, config.hue_spread)
    saturation, value = rng.uniform(*config.saturation_range), rng.uniform(*_VALUE)
    base = _hsv_to_rgb(np.array(hue), np.array(saturation), np.array(value))
    pattern = _hsv_to_rgb(np.array(hue + rng.uniform(-0.05, 0.05)), np.array(saturation),
                          np.array(value * rng.uniform(0.25, 0.75)))
    return 255 * base, 255 * pattern


def _hue_centre(category: int) -> float:
    # Golden-ratio spacing keeps the centres of any number of classes spread out; things and stuff
    # share the colour wheel so that colour does not even tell things from stuff.
    return (category * 0.618034) % 1.0


def _paint(rng: np.random.Generator, config: SceneConfig, pattern: str, period: float, u, v,
           hue_centre: float) -> np.ndarray:
    """(..., 3) float32 textured colour in [0, 255] at the coordinates (u, v) of shape (...)."""
    base, dark = _draw_colours(rng, config, hue_centre)
    t = _texture(pattern, u, v, period, rng)[..., None]
    return (base + (dark - base) * t).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Silhouettes: approximate signed distances (negative inside) in units of the object radius, in the
# object's frame (x, y). Within a pixel of the edge they are close to the true distance, which is all
# that the antialiasing needs.

def _box(x, y, half_width, half_height):
    qx, qy = np.abs(x) - half_width, np.abs(y) - half_height
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _regular_polygon(x, y, sides: int):
    """Circumradius 1, one vertex up."""
    angles = np.pi / 2 + np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    faces = x[..., None] * np.cos(angles) + y[..., None] * np.sin(angles)
    return faces.max(-1) - np.cos(np.pi / sides)


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance to the silhouette `shape`, which lies within radius _EXTENT of the origin."""
    rho = np.hypot(x, y)
    if shape == "disc":
        return rho - 1
    if shape == "triangle":
        return _regular_polygon(x, y, 3)
    if shape == "square":
        return _regular_polygon(x, y, 4)
    if shape == "star":  # five points, notches at 0.45 of the radius
        sector = (np.arctan2(y, x) * 5 / (2 * np.pi) + 0.25) % 1
        return rho - (0.45 + 0.55 * np.abs(2 * sector - 1))
    if shape == "cross":
        return np.minimum(_box(x, y, 1.0, 0.33), _box(x, y, 0.33, 1.0))
    if shape == "ring":
        return np.abs(rho - 0.75) - 0.25
    if shape == "crescent":
        return np.maximum(rho - 1, 0.8 - np.hypot(x - 0.45, y))
    if shape == "capsule":
        return np.hypot(x - np.clip(x, -0.6, 0.6), y) - 0.4
    raise UserError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------------------------------
# Scene assembly.

def _rotated(x, y, degrees: float):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _stuff_layer(rng, config: SceneConfig, px, py):
    """Background: (H, W) region index into the returned (r,) stuff categories, and (H, W, 3) colour."""
    size, things = config.image_size, config.num_thing_classes
    count = rng.integers(config.stuff_per_image[0], config.stuff_per_image[1] + 1)
    classes = np.sort(rng.choice(config.num_stuff_classes, size=count, replace=False))
    # The regions are the argmax of one smooth field per class: large blobs with smooth borders.
    region = _smooth_fields(rng, len(classes), size, 0.45 * size).argmax(0)
    image = np.zeros(px.shape + (3,), np.float32)
    for r, c in enumerate(classes):
        offset_x, offset_y, angle = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, 360)
        mask = region == r
        if mask.any():  # the argmax can leave a class without pixels
            u, v = _rotated(px[mask] + offset_x, py[mask] + offset_y, angle)
            image[mask] = _paint(rng, config, STUFF_TEXTURES[c], STUFF_PERIODS[c] * size, u, v,
                                 _hue_centre(things + c))
    return region, things + classes, image


class _Object(NamedTuple):
    category: int
    window: tuple[slice, slice]  # the part of the image that the object can cover
    distance: np.ndarray         # (h, w) signed distance to the edge in pixels, over the window
    paint: np.ndarray            # (h, w, 3) colour over the window


# Every silhouette lies within this many radii of its centre (the corners of the cross).
_EXTENT = 1.06


def _objects(rng, config: SceneConfig, px, py) -> list[_Object]:
    """All drawn objects, back to front, each computed over its own window only."""
    size = config.image_size
    count = rng.integers(config.objects_per_image[0], config.objects_per_image[1] + 1)
    objects = []
    for _ in range(count):
        category = int(rng.integers(config.num_thing_classes))
        radius = rng.uniform(*config.scale_range) * size
        rotation = rng.uniform(*config.rotation_range)
        centre_x, centre_y = rng.uniform(0, size, 2)
        reach = _EXTENT * radius + 1  # + 1 pixel for the antialiased edge
        window = tuple(slice(max(0, int(c - reach)), min(size, int(np.ceil(c + reach))))
                       for c in (centre_y, centre_x))
        u, v = _rotated(px[window] - centre_x, py[window] - centre_y, rotation)
        distance = _shape_distance(THING_SHAPES[category], u / radius, v / radius) * radius
        pattern, period = THING_TEXTURES[category]
        paint = _paint(rng, config, pattern, period * size, u, v, _hue_centre(category))
        objects.append(_Object(category, window, distance, paint))
    return objects


def _owner(objects: list[_Object], size: int) -> np.ndarray:
    """(H, W) index of the topmost object whose edge encloses each pixel centre, -1 where none does."""
    owner = np.full((size, size), -1)
    for i, obj in enumerate(objects):
        owner[obj.window][obj.distance < 0] = i  # later objects paint over earlier ones
    return owner


def _ignore_band(ids: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels with a different id within Chebyshev distance `width` (max != min over the
    (2 width + 1)^2 window, taken separably; edge padding so that the image border is no boundary)."""
    padded = np.pad(ids, width, mode="edge")
    size_y, size_x = ids.shape
    window = range(2 * width + 1)
    row_max = np.max([padded[:, d:d + size_x] for d in window], axis=0)
    row_min = np.min([padded[:, d:d + size_x] for d in window], axis=0)
    high = np.max([row_max[d:d + size_y] for d in window], axis=0)
    low = np.min([row_min[d:d + size_y] for d in window], axis=0)
    return high != low


def _segment_table(panoptic: np.ndarray, category: np.ndarray, is_thing: np.ndarray) -> dict:
    """Table of the segments 1..n of `panoptic`; category / is_thing indexed by id - 1."""
    n = len(category)
    flat = panoptic.ravel()
    ys, xs = np.divmod(np.arange(flat.size), panoptic.shape[1])
    low_x, low_y = np.full(n + 1, flat.size), np.full(n + 1, flat.size)
    high_x, high_y = np.full(n + 1, -1), np.full(n + 1, -1)
    np.minimum.at(low_x, flat, xs)
    np.minimum.at(low_y, flat, ys)
    np.maximum.at(high_x, flat, xs)
    np.maximum.at(high_y, flat, ys)
    bbox = np.stack([low_x, low_y, high_x - low_x + 1, high_y - low_y + 1], -1)[1:]
    return {"id": np.arange(1, n + 1, dtype=np.int32), "category_id": category.astype(np.int32),
            "is_thing": is_thing.astype(bool), "iscrowd": np.zeros(n, bool),
            "area": np.bincount(flat, minlength=n + 1)[1:].astype(np.int32),
            "bbox": bbox.astype(np.int32)}


def generate_scene(config: SceneConfig, index: int) -> dict:
    """Scene `index` (>= 0) of the dataset `config` (conventions: module docstring).

    Returns:
      {"image": (S, S, 3) uint8, "semantic": (S, S) uint8 category ids / 255, "panoptic": (S, S) int32
       segment ids / 0, "segments": the segment table (dict of (n,) arrays, "bbox" (n, 4)),
       "labels": (K,) uint8 multi-hot}.
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise UserError(f"scene index must be an integer >= 0, got {index!r}")
    rng = np.random.default_rng([config.seed, int(index)])
    # Pixel centres, float32: the whole scene is computed in single precision.
    py, px = np.mgrid[:config.image_size, :config.image_size].astype(np.float32) + 0.5

    region, stuff_categories, image = _stuff_layer(rng, config, px, py)
    objects = _objects(rng, config, px, py)

    # Leave out the objects that end up mostly hidden; removing objects only uncovers the others, so
    # one pass is enough.
    total = [(obj.distance < 0).sum() for obj in objects]  # windows are clipped to the image
    visible = np.bincount(_owner(objects, config.image_size).ravel() + 1,
                          minlength=len(objects) + 1)[1:]
    objects = [obj for obj, whole, shown in zip(objects, total, visible)
               if whole > 0 and shown >= config.min_visible_fraction * whole]
    owner = _owner(objects, config.image_size)
    thing_categories = np.array([o.category for o in objects], np.int32)

    # Antialiased compositing: each object covers a pixel by the fraction of it inside its edge.
    for obj in objects:
        alpha = np.clip(0.5 - obj.distance, 0, 1)[..., None]
        image[obj.window] = image[obj.window] * (1 - alpha) + obj.paint * alpha
    image = (image * rng.uniform(0.85, 1.15)
             + _PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32))

    # Provisional ids: stuff regions 1..r, objects r+1..r+n; then the border becomes void and the
    # segments left without pixels are dropped by renumbering the others consecutively.
    ids = np.where(owner >= 0, len(stuff_categories) + owner, region) + 1
    if config.ignore_border:
        ids[_ignore_band(ids, config.ignore_border)] = 0
    category = np.concatenate([stuff_categories, thing_categories]).astype(np.int32)
    is_thing = np.arange(len(category)) >= len(stuff_categories)
    present = np.bincount(ids.ravel(), minlength=len(category) + 1)[1:] > 0
    renumber = np.zeros(len(category) + 1, np.int32)
    renumber[1:][present] = np.arange(1, present.sum() + 1)
    panoptic = renumber[ids]
    segments = _segment_table(panoptic, category[present], is_thing[present])

    semantic_of_id = np.concatenate([[255], segments["category_id"]]).astype(np.uint8)
    labels = np.zeros(config.num_classes, np.uint8)
    labels[segments["category_id"]] = 1
    return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8),
            "semantic": semantic_of_id[panoptic], "panoptic": panoptic, "segments": segments,
            "labels": labels}
