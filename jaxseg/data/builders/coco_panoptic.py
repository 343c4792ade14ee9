"""`jaxseg_coco_panoptic`: COCO panoptic segmentation 2017 (133 categories: 80 things, 53 stuff) from the
official downloads, as TFDS ArrayRecord.

Build from the extracted downloads (layout: `JaxsegCocoPanoptic.MANUAL_DOWNLOAD_INSTRUCTIONS`; more in
`manual`):

    JaxsegCocoPanoptic(manual_dir=MANUAL, data_dir=DIR).download_and_prepare(file_format="array_record")
    train = tfds.data_source("jaxseg_coco_panoptic", data_dir=DIR, split="train")

Splits, each sorted by image id: train (118,287 images), validation (5,000).

Features of one example (H, W: the image's size; n = segments; the panoptic ones as in `scenes`):
  image:     (H, W, 3) uint8, PNG (decoded from the JPEG).
  panoptic:  (H, W) int32 COCO segment ids (id = R + 256 G + 256^2 B of the official PNG), 0 = void; a
             zlib-compressed Tensor (TFDS decodes PNG images with PIL only for uint8).
  segments:  dict of per-segment lists, the json's `segments_info`: "id", "category_id" (int32), the
             contiguous category 0..132 (`category_table`: things 0..79, stuff 80..132, each in the
             json's order), "is_thing", "iscrowd" (bool), "area" (int32), "bbox" (4,) int32 [x, y, width, height]
             (an image without segments reads back as empty lists).
  semantic:  (H, W, 1) uint8 contiguous category, 255 = void or crowd, PNG.
  labels:    (133,) uint8 multi-hot of the categories with a segment, crowd segments included.
  image_id:  int64 COCO image id.
Metadata "categories" (`tfds.builder(...).info.metadata`): the json's category table in contiguous
order, [{"id": 0..132, "coco_id", "name", "isthing"}].
"""
from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxseg.data.builders.manual import (
    ManualBuilder,
    ManualDir,
    multi_hot,
    scalar,
    segments_feature,
    semantic_example,
    semantic_features,
)
from jaxseg.errors import UserError

NUM_CATEGORIES = 133
_IMAGES = "{folder}.zip (http://images.cocodataset.org/zips/{folder}.zip)"
_ANNOTATIONS = ("panoptic_annotations_trainval2017.zip "
                "(http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip)")
_PANOPTIC_PNGS = f"annotations/panoptic_{{folder}}.zip, inside {_ANNOTATIONS}"


def category_table(categories: list, where) -> list[dict]:
    """The categories of a COCO panoptic json (`where` names it in errors) in contiguous order, things
    first, stuff after, each group in the json's order (COCO's own json lists its 80 things first, so its
    order is kept): [{"id": 0.., "coco_id": the json's id, "name", "isthing"}]. At most 255: the semantic
    maps are uint8 with 255 ignored."""
    if not isinstance(categories, list) or not categories:
        raise UserError(f"{where}: 'categories' must be a non-empty list of {{'id', 'name', 'isthing'}}")
    for index, c in enumerate(categories):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
                and c.get("isthing") in (0, 1)):
            raise UserError(f"{where}: category {index} ({c!r}) needs an integer 'id', a 'name' and 'isthing' "
                            f"0 or 1")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: category ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    if len(categories) > 255:
        raise UserError(f"{where} has {len(categories)} categories; at most 255 fit the uint8 labels (255 = ignore)")
    ordered = sorted(categories, key=lambda c: not c["isthing"])  # stable
    return [{"id": index, "coco_id": c["id"], "name": c["name"], "isthing": bool(c["isthing"])}
            for index, c in enumerate(ordered)]


def segment_table(segments_info: list[dict], categories: dict[int, dict], where) -> dict[str, np.ndarray]:
    """The segment table of one image (`where` names it in errors); `categories` maps the json's category
    ids to the rows of `category_table`."""
    for s in segments_info:
        if not all(key in s for key in ("id", "category_id", "iscrowd", "area", "bbox")):
            raise UserError(f"{where}: segment {s!r} needs 'id', 'category_id', 'iscrowd', 'area' and 'bbox'")
        if s["category_id"] not in categories:
            raise UserError(f"{where}: segment {s['id']} has category_id {s['category_id']}, which is not one of "
                            f"the json's categories {sorted(categories)}")
    ids = [s["id"] for s in segments_info]
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: segment ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    rows = [categories[s["category_id"]] for s in segments_info]
    return {"id": np.array(ids, np.int32),
            "category_id": np.array([c["id"] for c in rows], np.int32),
            "is_thing": np.array([c["isthing"] for c in rows], bool),
            "iscrowd": np.array([s["iscrowd"] for s in segments_info], bool),
            "area": np.array([s["area"] for s in segments_info], np.int32),
            "bbox": np.array([s["bbox"] for s in segments_info], np.int32).reshape(-1, 4)}


def panoptic_features(num_categories: int, image_id) -> dict:
    """`semantic_features` plus the panoptic ids and the segment table; `image_id` its feature."""
    return dict(semantic_features(num_categories), image_id=image_id,
                panoptic=tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib"),
                segments=segments_feature())


def panoptic_ids(png: epath.Path) -> np.ndarray:
    """(H, W) int32 segment ids of a COCO panoptic PNG: R + 256 G + 256^2 B."""
    with Image.open(png) as ids:
        rgb = np.asarray(ids.convert("RGB"), np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def panoptic_example(image_id, image: epath.Path, panoptic: np.ndarray, segments: dict, labels: np.ndarray) -> dict:
    """The `panoptic_features` of one image: its semantic map holds each non-crowd segment's category
    (crowd regions are ignored, as EoMT's training and PQ ignore them), 255 elsewhere."""
    semantic = np.full(panoptic.shape, 255, np.uint8)
    for segment_id, category, crowd in zip(segments["id"], segments["category_id"], segments["iscrowd"]):
        if not crowd:
            semantic[panoptic == segment_id] = category
    return dict(semantic_example(image, semantic, labels, image_id), panoptic=panoptic, segments=segments)


class JaxsegCocoPanoptic(ManualBuilder):
    """COCO panoptic 2017, 133 categories (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    HOMEPAGE = "https://cocodataset.org/#panoptic-2017"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Extract into the manual directory:
      {_IMAGES.format(folder="train2017")} and {_IMAGES.format(folder="val2017")}, giving
        train2017/<image id, 12 digits>.jpg, val2017/<...>.jpg
      {_ANNOTATIONS}, giving
        annotations/panoptic_train2017.json, annotations/panoptic_val2017.json
        annotations/panoptic_train2017.zip, annotations/panoptic_val2017.zip: extract these two in
        annotations/ as well, giving annotations/panoptic_train2017/<...>.png, .../panoptic_val2017/<...>.png
    """

    def _features(self) -> dict:
        return panoptic_features(NUM_CATEGORIES, scalar(np.int64))

    def _split_items(self, files: ManualDir) -> dict:
        splits, table = {}, None
        for split, folder in (("train", "train2017"), ("validation", "val2017")):
            json_path = files.path(f"annotations/panoptic_{folder}.json", _ANNOTATIONS)
            annotations = json.loads(json_path.read_text())
            categories = category_table(annotations["categories"], json_path)
            if len(categories) != NUM_CATEGORIES:
                raise UserError(f"{json_path} has {len(categories)} categories, expected COCO panoptic's "
                                f"{NUM_CATEGORIES}")
            if table is None:
                table = categories
            elif categories != table:
                raise UserError(f"{json_path} has other categories than the train json")
            categories = {c["coco_id"]: c for c in table}
            images = {image["id"]: image["file_name"] for image in annotations["images"]}
            items = []
            for a in sorted(annotations["annotations"], key=lambda a: a["image_id"]):
                image = files.path(f"{folder}/{images[a['image_id']]}", _IMAGES.format(folder=folder))
                png = files.path(f"annotations/panoptic_{folder}/{a['file_name']}",
                                 _PANOPTIC_PNGS.format(folder=folder))
                segments = segment_table(a["segments_info"], categories, f"{json_path}, image {a['image_id']}")
                items.append((a["image_id"], (a["image_id"], image, png, segments)))
            splits[split] = items
        self.info.metadata["categories"] = table
        return splits

    @staticmethod
    def _example(item) -> dict:
        image_id, image, png, segments = item
        # Crowd segments count as image-level labels.
        return panoptic_example(image_id, image, panoptic_ids(png), segments,
                                multi_hot(segments["category_id"], NUM_CATEGORIES))
