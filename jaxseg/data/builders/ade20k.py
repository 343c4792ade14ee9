"""`jaxseg_ade20k`: ADE20K semantic segmentation (SceneParse150, ADEChallengeData2016: 150 classes) from the
official download, as TFDS ArrayRecord.

Build from the extracted download (layout: `JaxsegAde20k.MANUAL_DOWNLOAD_INSTRUCTIONS`; more in `manual`):

    JaxsegAde20k(manual_dir=MANUAL, data_dir=DIR).download_and_prepare(file_format="array_record")
    train = tfds.data_source("jaxseg_ade20k", data_dir=DIR, split="train")

Splits, each sorted by image name: train (20,210 images), validation (2,000).

Features of one example (H, W: the image's size):
  image:     (H, W, 3) uint8, PNG (decoded from the JPEG).
  semantic:  (H, W, 1) uint8 classes 0..149, 255 = ignore, PNG: the official annotation with
             "reduce_zero_label" applied, as EoMT and mmsegmentation train and evaluate: its 0 ("other
             objects") becomes 255, class k becomes k - 1.
  labels:    (150,) uint8 multi-hot of the classes present.
  image_id:  bytes, the image name, e.g. b"ADE_train_00000001".
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

_ZIP = "ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)"
_ROOT = "ADEChallengeData2016"
_REDUCE_ZERO_LABEL = lookup_table({k: k - 1 for k in range(1, 151)})


class JaxsegAde20k(ManualBuilder):
    """ADE20K (SceneParse150) semantic segmentation, 150 classes (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Extract into the manual directory:
      {_ZIP}, giving
        {_ROOT}/images/training/<name>.jpg, {_ROOT}/images/validation/<name>.jpg
        {_ROOT}/annotations/training/<name>.png, {_ROOT}/annotations/validation/<name>.png
    """

    def _features(self) -> dict:
        return semantic_features(150)

    def _split_items(self, files: ManualDir) -> dict:
        def items(folder: str) -> list:
            return [(image.stem, (image.stem, image,
                                  files.path(f"{_ROOT}/annotations/{folder}/{image.stem}.png", _ZIP)))
                    for image in files.glob(f"{_ROOT}/images/{folder}", "*.jpg", _ZIP)]

        return {"train": items("training"), "validation": items("validation")}

    @staticmethod
    def _example(item) -> dict:
        name, image, annotation = item
        semantic = _REDUCE_ZERO_LABEL[read_label(annotation)]
        return semantic_example(image, semantic, multi_hot(semantic, 150), name)
