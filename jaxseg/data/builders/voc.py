"""`jaxseg_voc`: PASCAL VOC 2012 semantic segmentation with the extra SBD annotations ("train_aug", the
training set of WeakTr and most weakly-supervised work), from the official downloads, as TFDS ArrayRecord.

Build from the extracted downloads (layout: `JaxsegVoc.MANUAL_DOWNLOAD_INSTRUCTIONS`; more in `manual`):

    JaxsegVoc(manual_dir=MANUAL, data_dir=DIR).download_and_prepare(file_format="array_record")
    train = tfds.data_source("jaxseg_voc", data_dir=DIR, split="train_aug")

Splits, each sorted by image name:
  train_aug:   10,582 images: (SBD train ∪ SBD val ∪ VOC train) minus VOC val.
  train:       1,464 images of VOC's Segmentation/train.txt (WeakTr checks its CAMs on them).
  validation:  1,449 images of VOC's Segmentation/val.txt.
An image's labels are VOC's SegmentationClass PNG where VOC has one (every train and val image: the
official annotation, with 255 on object borders), else SBD's `cls/<name>.mat` (no borders).

Features of one example (H, W: the image's size):
  image:     (H, W, 3) uint8, PNG (decoded from the JPEG).
  semantic:  (H, W, 1) uint8: 0 background, 1..20 the classes, 255 border / ignore, PNG.
  labels:    (20,) uint8 multi-hot of the foreground classes present, class c at index c - 1 (the form
             of WeakTr's cls_labels.npy; that file was made from the XML object annotations, these are
             read from the segmentation, so an object without pixels there is not counted).
  image_id:  bytes, the VOC image name, e.g. b"2007_000032".
"""
from __future__ import annotations

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from etils import epath

from jaxseg.data.builders.manual import (
    ManualBuilder,
    ManualDir,
    multi_hot,
    read_label,
    semantic_example,
    semantic_features,
)

_VOC_TAR = "VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)"
_SBD_TGZ = ("benchmark.tgz (SBD, http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
            "semantic_contours/benchmark.tgz)")
_VOC = "VOCdevkit/VOC2012"
_SBD = "benchmark_RELEASE/dataset"
# The 20 classes, label c + 1 (0 is the background).
CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _names(files: ManualDir, relative: str, download: str) -> set[str]:
    return set(files.path(relative, download).read_text().split())


def _sbd_label(path: epath.Path) -> np.ndarray:
    # SBD's MATLAB struct GTcls holds the class map in its field Segmentation.
    with path.open("rb") as f:
        segmentation = scipy.io.loadmat(f, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    return np.asarray(segmentation, np.uint8)


class JaxsegVoc(ManualBuilder):
    """PASCAL VOC 2012 semantic segmentation with the SBD train_aug set (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Extract into the manual directory:
      {_VOC_TAR}, giving
        {_VOC}/JPEGImages/<name>.jpg
        {_VOC}/SegmentationClass/<name>.png
        {_VOC}/ImageSets/Segmentation/train.txt, val.txt
      {_SBD_TGZ}, giving
        {_SBD}/cls/<name>.mat
        {_SBD}/train.txt, val.txt
    """

    def _features(self) -> dict:
        return semantic_features(20)

    def _split_items(self, files: ManualDir) -> dict:
        voc_train = _names(files, f"{_VOC}/ImageSets/Segmentation/train.txt", _VOC_TAR)
        voc_val = _names(files, f"{_VOC}/ImageSets/Segmentation/val.txt", _VOC_TAR)
        sbd = _names(files, f"{_SBD}/train.txt", _SBD_TGZ) | _names(files, f"{_SBD}/val.txt", _SBD_TGZ)
        voc_labelled = voc_train | voc_val

        def item(name: str) -> tuple:
            if name in voc_labelled:
                label = files.path(f"{_VOC}/SegmentationClass/{name}.png", _VOC_TAR)
            else:
                label = files.path(f"{_SBD}/cls/{name}.mat", _SBD_TGZ)
            return name, (name, files.path(f"{_VOC}/JPEGImages/{name}.jpg", _VOC_TAR), label)

        def items(names: set[str]) -> list:
            return [item(name) for name in sorted(names)]

        return {"train_aug": items((sbd | voc_train) - voc_val), "train": items(voc_train),
                "validation": items(voc_val)}

    @staticmethod
    def _example(item) -> dict:
        name, image, label = item
        semantic = _sbd_label(label) if label.suffix == ".mat" else read_label(label)
        # Index 0, background, is no image-level label.
        return semantic_example(image, semantic, multi_hot(semantic, 21)[1:], name)
