"""`jaxseg_cityscapes`: Cityscapes semantic segmentation (fine annotations, the 19 evaluated classes) from
the official downloads, as TFDS ArrayRecord.

Build from the extracted downloads (layout: `JaxsegCityscapes.MANUAL_DOWNLOAD_INSTRUCTIONS`; more in
`manual`):

    JaxsegCityscapes(manual_dir=MANUAL, data_dir=DIR).download_and_prepare(file_format="array_record")
    train = tfds.data_source("jaxseg_cityscapes", data_dir=DIR, split="train")

Splits, each sorted by city, then image name: train (2,975 images), validation (500).

Features of one example (H, W: the image's size, 1024 x 2048):
  image:     (H, W, 3) uint8, PNG (the official file, stored as it is).
  semantic:  (H, W, 1) uint8 train ids 0..18, 255 = ignore, PNG: the gtFine labelIds mapped with the
             official labelId -> trainId table (cityscapesScripts helpers/labels.py).
  labels:    (19,) uint8 multi-hot of the train ids present.
  image_id:  bytes, the image name, e.g. b"aachen_000000_000019".
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from jaxseg.data.builders.manual import (
    ManualBuilder,
    ManualDir,
    lookup_table,
    multi_hot,
    read_label,
    semantic_example,
    semantic_features,
)

_DOWNLOADS = "https://www.cityscapes-dataset.com/downloads/ (registration needed)"
_IMAGES = f"leftImg8bit_trainvaltest.zip ({_DOWNLOADS})"
_LABELS = f"gtFine_trainvaltest.zip ({_DOWNLOADS})"
_IMAGE_SUFFIX = "_leftImg8bit.png"
# The 19 evaluated classes by train id.
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")

# labelId -> trainId of the 19 evaluated classes; every other labelId (void, and classes such as
# "parking" or "guard rail" that are annotated but not evaluated) is ignored.
_TRAIN_IDS = lookup_table({
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
})


class JaxsegCityscapes(ManualBuilder):
    """Cityscapes semantic segmentation, 19 train ids (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Extract into the manual directory:
      {_IMAGES}, giving
        leftImg8bit/train/<city>/<city>_<seq>_<frame>{_IMAGE_SUFFIX}, leftImg8bit/val/<city>/...
      {_LABELS}, giving
        gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png, gtFine/val/<city>/...
    """

    def _features(self) -> dict:
        return semantic_features(19)

    def _split_items(self, files: ManualDir) -> dict:
        def items(folder: str) -> list:
            result = []
            for image in files.glob(f"leftImg8bit/{folder}", f"*/*{_IMAGE_SUFFIX}", _IMAGES):
                name = image.name.removesuffix(_IMAGE_SUFFIX)
                label = files.path(f"gtFine/{folder}/{image.parent.name}/{name}_gtFine_labelIds.png", _LABELS)
                result.append((name, (name, image, label)))
            return result

        return {"train": items("train"), "validation": items("val")}

    @staticmethod
    def _example(item) -> dict:
        name, image, label = item
        semantic = _TRAIN_IDS[read_label(label)]
        return semantic_example(image, semantic, multi_hot(semantic, 19), name)
