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
             contiguous category 0..132 in the json's category order (things 0..79, stuff 80..132),
             "is_thing", "iscrowd" (bool), "area" (int32), "bbox" (4,) int32 [x, y, width, height]
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


def _categories(annotations: dict, name: str) -> list[dict]:
    table = [{"id": index, "coco_id": c["id"], "name": c["name"], "isthing": bool(c["isthing"])}
             for index, c in enumerate(annotations["categories"])]
    if len(table) != NUM_CATEGORIES:
        raise UserError(f"{name} has {len(table)} categories, expected COCO panoptic's {NUM_CATEGORIES}")
    return table


def _segments(segments_info: list[dict], categories: dict[int, dict]) -> dict[str, np.ndarray]:
    """The segment table of one image; `categories` maps COCO category ids to the metadata's rows."""
    rows = [categories[s["category_id"]] for s in segments_info]
    return {"id": np.array([s["id"] for s in segments_info], np.int32),
            "category_id": np.array([c["id"] for c in rows], np.int32),
            "is_thing": np.array([c["isthing"] for c in rows], bool),
            "iscrowd": np.array([s["iscrowd"] for s in segments_info], bool),
            "area": np.array([s["area"] for s in segments_info], np.int32),
            "bbox": np.array([s["bbox"] for s in segments_info], np.int32).reshape(-1, 4)}


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
        return dict(semantic_features(NUM_CATEGORIES), image_id=scalar(np.int64),
                    panoptic=tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib"),
                    segments=segments_feature())

    def _split_items(self, files: ManualDir) -> dict:
        splits, table = {}, None
        for split, folder in (("train", "train2017"), ("validation", "val2017")):
            json_path = files.path(f"annotations/panoptic_{folder}.json", _ANNOTATIONS)
            annotations = json.loads(json_path.read_text())
            if table is None:
                table = _categories(annotations, json_path)
            elif _categories(annotations, json_path) != table:
                raise UserError(f"{json_path} has other categories than the train json")
            categories = {c["coco_id"]: c for c in table}
            images = {image["id"]: image["file_name"] for image in annotations["images"]}
            items = []
            for a in sorted(annotations["annotations"], key=lambda a: a["image_id"]):
                image = files.path(f"{folder}/{images[a['image_id']]}", _IMAGES.format(folder=folder))
                png = files.path(f"annotations/panoptic_{folder}/{a['file_name']}",
                                 _PANOPTIC_PNGS.format(folder=folder))
                items.append((a["image_id"], (a["image_id"], image, png,
                                              _segments(a["segments_info"], categories))))
            splits[split] = items
        self.info.metadata["categories"] = table
        return splits

    @staticmethod
    def _example(item) -> dict:
        image_id, image, png, segments = item
        with Image.open(png) as ids:
            rgb = np.asarray(ids.convert("RGB"), np.int32)
        panoptic = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        semantic = np.full(panoptic.shape, 255, np.uint8)
        for segment_id, category, crowd in zip(segments["id"], segments["category_id"], segments["iscrowd"]):
            if not crowd:  # crowd regions are ignored, as EoMT's training and PQ ignore them
                semantic[panoptic == segment_id] = category
        example = semantic_example(image, semantic, multi_hot(segments["category_id"], NUM_CATEGORIES),
                                   image_id)
        return dict(example, panoptic=panoptic, segments=segments)
