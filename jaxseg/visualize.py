"""Predictions as images: palette label PNGs (raw class ids a program can read back), COCO-style
RGB-encoded panoptic PNGs, and overlays of semantic, panoptic and CAM predictions on the image for
people. `PredictionWriter` writes all of them for each prediction of an evaluator run, the overlays
enlarged and with a legend (`annotated`)."""
from __future__ import annotations

import colorsys
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxseg.data.datasets import image_name
from jaxseg.errors import UserError

BORDER_COLOR = (255, 255, 255)
# The written overlays are enlarged by a whole factor to at least this short side: at a dataset's 32-64 px
# nothing is legible.
MIN_SIDE = 256
# Legend layout in pixels: entries fill fixed-width columns row by row, so where an entry lies depends
# on its index alone, not on the text before it.
LEGEND_PAD, SWATCH, LEGEND_ROW, LEGEND_COLUMN = 4, 12, 16, 128
LEGEND_BACKGROUND, LEGEND_TEXT = (255, 255, 255), (0, 0, 0)
# A legend entry: the colours of its swatch, side by side (none: text only), and its text.
Entry = tuple[Sequence[Sequence[float]], str]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved RGB per label), 256 entries."""
    palette = []
    for label in range(256):
        r = g = b = 0
        for shift in range(8):
            r |= ((label >> 0) & 1) << (7 - shift)
            g |= ((label >> 1) & 1) << (7 - shift)
            b |= ((label >> 2) & 1) << (7 - shift)
            label >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = np.asarray(voc_palette(), np.uint8).reshape(256, 3)


def _check_labels(label_map, what: str) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise UserError(f"{what} must be an (H, W) integer array, got {label_map.dtype} {label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise UserError(f"{what} holds values in [{label_map.min()}, {label_map.max()}]; a palette PNG "
                        f"stores 0..255")
    return label_map


def _check_image(image, shape: tuple[int, ...] | None = None) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if shape is not None and image.shape[:2] != tuple(shape):
        raise UserError(f"the prediction is {tuple(shape)}, the image {image.shape[:2]}")
    return image


def label_png(label_map) -> Image.Image:
    """(H, W) class ids 0..255 -> palette ("P") image whose pixel values are the ids."""
    png = Image.fromarray(_check_labels(label_map, "label map").astype(np.uint8), mode="P")
    png.putpalette(voc_palette())
    return png


def _blend(image: np.ndarray, colors: np.ndarray, painted: np.ndarray, ids: np.ndarray,
           alpha: float) -> np.ndarray:
    """`colors` blended into `image` where `painted`, and a line wherever `ids` changes between 4-neighbours
    (adjacent segments of one colour stay apart)."""
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colors[painted]
    border = np.zeros(ids.shape, bool)
    border[:-1] |= ids[:-1] != ids[1:]
    border[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[border] = BORDER_COLOR
    return np.round(out).astype(np.uint8)


def overlay(image, label_map, alpha: float = 0.5, ignore: Sequence[int] = (255,)) -> np.ndarray:
    """uint8 (H, W, 3): the VOC palette colour of each class blended into the image (labels in `ignore`
    left unpainted), segment borders drawn."""
    label_map = _check_labels(label_map, "label map")
    image = _check_image(image, label_map.shape)
    return _blend(image, _PALETTE[label_map], ~np.isin(label_map, ignore), label_map, alpha)


def segment_colors(segments: Sequence[dict]) -> dict[int, np.ndarray]:
    """{segment id: RGB}: stuff in its category's palette colour, every thing segment its own hue (golden-
    ratio steps around the colour wheel, so neighbours in the list differ most)."""
    colors, things = {}, 0
    for segment in segments:
        if segment["is_thing"]:
            hue = (things * 0.618033988749895) % 1.0
            colors[segment["id"]] = np.asarray(colorsys.hsv_to_rgb(hue, 0.75, 0.95)) * 255
            things += 1
        else:
            colors[segment["id"]] = _PALETTE[segment["category_id"]].astype(np.float64)
    return colors


def panoptic_overlay(image, panoptic_ids, segments: Sequence[dict], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) of a panoptic prediction ((H, W) segment ids, 0 = void, described by `segments`):
    colours of `segment_colors`, void unpainted, segment borders drawn."""
    panoptic_ids = np.asarray(panoptic_ids)
    image = _check_image(image, panoptic_ids.shape)
    colors = segment_colors(segments)
    ids, inverse = np.unique(panoptic_ids, return_inverse=True)
    unknown = sorted(int(i) for i in ids if i != 0 and int(i) not in colors)
    if unknown:
        raise UserError(f"segment ids {unknown} of the panoptic map are not in `segments`")
    table = np.stack([colors.get(int(i), np.zeros(3)) for i in ids])
    return _blend(image, table[inverse.reshape(panoptic_ids.shape)], panoptic_ids != 0, panoptic_ids, alpha)


def jet(values) -> np.ndarray:
    """(...) values in [0, 1] -> (..., 3) float RGB in [0, 1] of the jet colour map (blue, cyan, yellow,
    red)."""
    values = np.asarray(values, np.float32)[..., None]
    return np.clip(1.5 - np.abs(4 * values - np.asarray([3, 2, 1], np.float32)), 0, 1)


def cam_overlay(image, cam, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): an (H, W) activation map in [0, 1] in jet colours blended over the whole image."""
    cam = np.asarray(cam)
    image = _check_image(image, cam.shape)
    if cam.size and not (cam.min() >= 0 and cam.max() <= 1):  # NaN fails both comparisons
        raise UserError(f"a CAM must lie in [0, 1], got values in [{cam.min()}, {cam.max()}]")
    out = (1 - alpha) * image.astype(np.float32) + alpha * 255 * jet(cam)
    return np.round(out).astype(np.uint8)


def panoptic_png(panoptic_ids) -> Image.Image:
    """(H, W) segment ids -> RGB image in COCO's encoding, id = R + 256 G + 256^2 B."""
    panoptic_ids = np.asarray(panoptic_ids)
    if panoptic_ids.size and (panoptic_ids.min() < 0 or panoptic_ids.max() >= 256 ** 3):
        raise UserError(f"panoptic ids in [{panoptic_ids.min()}, {panoptic_ids.max()}] do not fit 24 bits")
    ids = panoptic_ids.astype(np.uint32)
    return Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8))


def upscale_factor(shape: Sequence[int]) -> int:
    """The whole factor that enlarges an (H, W) picture to a short side of at least MIN_SIDE (1: never
    smaller)."""
    return max(1, math.ceil(MIN_SIDE / max(min(shape), 1)))


def _upscaled_image(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width * factor, height * factor), Image.Resampling.BILINEAR))


def _upscaled_ids(ids, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: ids must not blend, and segment borders drawn afterwards stay 1 px."""
    return np.repeat(np.repeat(np.asarray(ids), factor, 0), factor, 1)


def _upscaled_cam(cam, factor: int) -> np.ndarray:
    height, width = np.shape(cam)
    cam = Image.fromarray(np.asarray(cam, np.float32)).resize((width * factor, height * factor),
                                                              Image.Resampling.BILINEAR)
    return np.clip(np.asarray(cam), 0, 1)  # bilinear weights sum to 1 only up to rounding


def class_label(class_id: int, class_names: Sequence[str] | None) -> str:
    """The name of `class_id` in `class_names`, "class <id>" where there is none."""
    return class_names[class_id] if class_names and class_id < len(class_names) else f"class {class_id}"


def semantic_legend(label_map, class_names: Sequence[str] | None = None,
                    ignore: Sequence[int] = (255,)) -> list[Entry]:
    """The legend of `overlay`: each class present, by id, in its palette colour."""
    present = np.setdiff1d(np.unique(_check_labels(label_map, "label map")), ignore)
    return [([_PALETTE[c]], class_label(int(c), class_names)) for c in present]


def panoptic_legend(panoptic_ids, segments: Sequence[dict], class_names: Sequence[str] | None = None
                    ) -> list[Entry]:
    """The legend of `panoptic_overlay`: each category with a segment in the map, by id. A stuff swatch is
    the category's palette colour; a thing swatch shows the colours of the category's segments side by
    side (each thing segment has its own), as many as fit."""
    present = set(np.unique(panoptic_ids).tolist())
    colors, swatches = segment_colors(segments), {}
    for segment in segments:
        if segment["id"] in present:
            swatches.setdefault(segment["category_id"], []).append(colors[segment["id"]])
    return [(swatches[c], class_label(c, class_names)) for c in sorted(swatches)]


def legend_columns(width: int) -> int:
    return max(1, width // LEGEND_COLUMN)


def legend_height(count: int, width: int) -> int:
    """Height of the strip `annotated` adds below a `width` px picture for `count` entries (0: none)."""
    rows = math.ceil(count / legend_columns(width))
    return rows * LEGEND_ROW + LEGEND_PAD if rows else 0


def swatch_box(index: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), ends exclusive, of entry `index`'s swatch in the strip below a `width` px
    picture."""
    row, column = divmod(index, legend_columns(width))
    left, top = LEGEND_PAD + column * LEGEND_COLUMN, LEGEND_PAD + row * LEGEND_ROW
    return left, top, left + SWATCH, top + SWATCH


def annotated(picture, entries: Sequence[Entry]) -> np.ndarray:
    """uint8 (H + legend_height, W, 3): `picture` with a strip below that holds the entries, each a swatch
    (`swatch_box`) and its text."""
    picture = _check_image(picture)
    width = picture.shape[1]
    strip = Image.new("RGB", (width, legend_height(len(entries), width)), LEGEND_BACKGROUND)
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for index, (colors, text) in enumerate(entries):
        left, top, right, bottom = swatch_box(index, width)
        edges = np.linspace(left, right, len(colors) + 1).round().astype(int)
        for color, start, end in zip(colors, edges[:-1], edges[1:]):
            if end > start:
                draw.rectangle((start, top, end - 1, bottom - 1), fill=tuple(int(v) for v in np.round(color)))
        draw.text((right + LEGEND_PAD if len(colors) else left, top), text, fill=LEGEND_TEXT, font=font)
    return np.concatenate([picture, np.asarray(strip)])


def _prediction_files(name: str, image: np.ndarray, prediction: dict,
                      class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """{file name: PIL image or JSON text} of one image's prediction."""
    semantic = np.asarray(prediction["semantic"])
    _check_image(image, semantic.shape)
    factor = upscale_factor(semantic.shape)
    large = _upscaled_image(image, factor)
    files = {f"{name}_semantic.png": label_png(semantic),
             f"{name}_overlay.png": Image.fromarray(annotated(
                 overlay(large, _upscaled_ids(semantic, factor)), semantic_legend(semantic, class_names)))}
    if "panoptic" in prediction:
        segments = [dict(id=int(s["id"]), category_id=int(s["category_id"]), is_thing=bool(s["is_thing"]),
                         score=float(s["score"])) for s in prediction["segments"]]
        panoptic = np.asarray(prediction["panoptic"])
        files[f"{name}_panoptic.png"] = panoptic_png(panoptic)
        files[f"{name}_panoptic_overlay.png"] = Image.fromarray(annotated(
            panoptic_overlay(large, _upscaled_ids(panoptic, factor), segments),
            panoptic_legend(panoptic, segments, class_names)))
        files[f"{name}_segments.json"] = json.dumps(segments, indent=1)
    if "cams" in prediction:
        cams = np.asarray(prediction["cams"])
        traits = prediction.get("trait_maps")
        # Every present class, even one whose CAM is zero everywhere (the model found nothing).
        for k, c in enumerate(prediction["cam_classes"]):
            # CAM class c is label c + 1 of the semantic (pseudo-label) map beside it: 0 is the background.
            title = class_names[c + 1] if class_names and c + 1 < len(class_names) else str(c)
            files[f"{name}_cam_{c}.png"] = Image.fromarray(annotated(
                cam_overlay(large, _upscaled_cam(cams[c], factor)), [((), f"class {title}")]))
            for head, trait in enumerate(traits[k] if traits is not None else ()):
                files[f"{name}_trait_{c}_head_{head}.png"] = Image.fromarray(annotated(
                    cam_overlay(large, _upscaled_cam(trait, factor)), [((), f"class {title}, head {head}")]))
    return files


class PredictionWriter:
    """Writes each prediction it is called with (`jaxseg.evaluate.Evaluator.run`'s `on_prediction`) into
    `out_dir`, named after the example (`image_name`):
      <name>_semantic.png          palette PNG whose values are the class ids;
      <name>_overlay.png           the classes over the image;
      <name>_panoptic.png          (panoptic predictions) segment ids, id = R + 256 G + 256^2 B (COCO);
      <name>_panoptic_overlay.png  the segments over the image;
      <name>_segments.json         the segments: id, category_id, is_thing, score;
      <name>_cam_<c>.png           (CAM predictions) class c's CAM over the image, for each present class;
      <name>_trait_<c>_head_<h>.png  (Prompt-CAM) class c's trait map of attention head h over the image,
                                   from "trait_maps" (K, heads, H, W) in [0, 1], row k for cam_classes[k].
    The raw files are at the image's size; the overlays are enlarged by `upscale_factor` and carry a legend
    (`semantic_legend`, `panoptic_legend`; a CAM's: "class <name>"). `class_names` are indexed by predicted
    class id (`jaxseg.data.datasets.DataConfig.class_names` in the space the method predicts); where it has
    no name, "class <id>". A CAM prediction's semantic map is in the "wsss" space, so CAM class c is named
    by class_names[c + 1] (without one, "class c" as in its file name). An existing file is an error unless
    `overwrite`. `written` lists the paths."""

    def __init__(self, out_dir: str | pathlib.Path, *, overwrite: bool = False,
                 class_names: Sequence[str] | None = None):
        self.out_dir, self.overwrite, self.class_names = pathlib.Path(out_dir), overwrite, class_names
        self.written: list[pathlib.Path] = []

    def __call__(self, index: int, example: dict, prediction: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files = _prediction_files(image_name(example, index), _check_image(example["image"]), prediction,
                                  self.class_names)
        paths = [self.out_dir / file_name for file_name in files]
        existing = [str(p) for p in paths if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(f"not overwriting {', '.join(existing)} (pass overwrite=True, or "
                                  f"--overwrite to the tools)")
        for path, content in zip(paths, files.values()):
            if isinstance(content, str):
                path.write_text(content)
            else:
                content.save(path)
        self.written += paths
