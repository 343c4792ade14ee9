"""The builders of the official datasets (VOC + SBD, ADE20K, Cityscapes, COCO panoptic), each on a tiny
fake dataset written in the real layout and file formats: built to ArrayRecord and read back with
`tfds.data_source` (exact labels, ignore values, multi-hot labels, segment tables, crowd handling,
split membership and order), the three ways to give the manual directory, and the errors for a missing
directory or file. TensorFlow is never imported."""
import json
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from jaxseg.data.builders.ade20k import JaxsegAde20k
from jaxseg.data.builders.cityscapes import JaxsegCityscapes
from jaxseg.data.builders.coco_panoptic import JaxsegCocoPanoptic
from jaxseg.data.builders.voc import JaxsegVoc

H, W = 24, 32
ARRAY_RECORD = "array_record"


@pytest.fixture(autouse=True)
def no_tensorflow():
    had_tensorflow = "tensorflow" in sys.modules
    yield
    assert had_tensorflow or "tensorflow" not in sys.modules


def _mkdir(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_image(path, seed: int) -> np.ndarray:
    """A random RGB image in the format of the suffix; returns what PIL decodes from the file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(_mkdir(path))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _label_map(background: int, first: int, second: int, border: int | None = None) -> np.ndarray:
    """(H, W) uint8: `background` with a block of `first` and one of `second`, optionally a `border`
    ring around the first (VOC marks object borders with 255)."""
    label = np.full((H, W), background, np.uint8)
    if border is not None:
        label[1:11, 2:13] = border
    label[2:10, 3:12] = first
    label[12:20, 15:30] = second
    return label


def _read(name: str, data_dir, split: str) -> list[dict]:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    return [source[i] for i in range(len(source))]


def _assert_semantic(example, image, semantic, labels, image_id):
    np.testing.assert_array_equal(example["image"], image)
    np.testing.assert_array_equal(example["semantic"], semantic[..., None])
    np.testing.assert_array_equal(example["labels"], labels)
    assert example["labels"].dtype == np.uint8
    assert example["image_id"] == image_id


def _hot(num_classes: int, *indices: int) -> np.ndarray:
    labels = np.zeros(num_classes, np.uint8)
    labels[list(indices)] = 1
    return labels


def _files(root) -> list:
    return [p for p in root.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD.

VOC, SBD = "VOCdevkit/VOC2012", "benchmark_RELEASE/dataset"
VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002"], ["2007_000003", "2008_000004"]
# 2007_000002 is in VOC train and SBD (VOC's PNG wins); 2007_000003 in VOC val and SBD (left out of
# train_aug); 2009_000005 and 2009_000006 in SBD only.
SBD_TRAIN, SBD_VAL = ["2009_000005", "2007_000002", "2007_000003"], ["2009_000006"]


def _voc_palette_png(path, label):
    """A palette PNG with VOC's colour map: the bits of index c, taken three at a time, give the high
    bits of c's red, green and blue. The labels are the indices, not the colours."""
    palette = np.zeros((256, 3), np.uint8)
    for c in range(256):
        for bit in range(8):
            palette[c] |= np.array([(c >> (3 * bit + k)) & 1 for k in range(3)], np.uint8) << (7 - bit)
    image = Image.frombytes("P", (W, H), label.tobytes())
    image.putpalette(palette.ravel().tolist())
    image.save(_mkdir(path))


def _write_voc(root) -> dict:
    """The fake VOC + SBD; returns {name: (image, semantic)} as the builder should store them."""
    (root / VOC / "ImageSets/Segmentation").mkdir(parents=True)
    (root / VOC / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (root / VOC / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    _mkdir(root / SBD / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (root / SBD / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    expected = {}
    for i, name in enumerate(sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))):
        image = _write_image(root / VOC / "JPEGImages" / f"{name}.jpg", seed=i)
        voc_label = _label_map(0, 1 + i, 20 - i, border=255)
        sbd_label = _label_map(0, 10 + i, 12)  # SBD has no borders
        if name in VOC_TRAIN + VOC_VAL:
            _voc_palette_png(root / VOC / "SegmentationClass" / f"{name}.png", voc_label)
        if name in SBD_TRAIN + SBD_VAL:
            scipy.io.savemat(_mkdir(root / SBD / "cls" / f"{name}.mat"), {"GTcls": {
                "Segmentation": sbd_label, "CategoriesPresent": np.unique(sbd_label[sbd_label > 0])}})
        expected[name] = image, voc_label if name in VOC_TRAIN + VOC_VAL else sbd_label
    return expected


def test_voc(tmp_path):
    manual = tmp_path / "manual"
    expected = _write_voc(manual)
    # Two worker processes: the examples must still come out in order.
    JaxsegVoc(manual_dir=manual, data_dir=tmp_path / "data", num_workers=2).download_and_prepare(
        file_format=ARRAY_RECORD)
    splits = {"train_aug": ["2007_000001", "2007_000002", "2009_000005", "2009_000006"],
              "train": VOC_TRAIN, "validation": VOC_VAL}
    for split, names in splits.items():
        examples = _read("jaxseg_voc", tmp_path / "data", split)
        assert [e["image_id"] for e in examples] == [n.encode() for n in names], split
        for example, name in zip(examples, names):
            image, semantic = expected[name]
            labels = _hot(20, *[c - 1 for c in np.unique(semantic) if 0 < c < 255])
            _assert_semantic(example, image, semantic, labels, name.encode())
    # Spelled out for two images: VOC's PNG (with its 255 border) over SBD's .mat, and an SBD-only one.
    voc_and_sbd, sbd_only = _read("jaxseg_voc", tmp_path / "data", "train_aug")[1:3]
    assert set(np.unique(voc_and_sbd["semantic"])) == {0, 2, 19, 255}
    np.testing.assert_array_equal(np.flatnonzero(voc_and_sbd["labels"]), [1, 18])
    assert set(np.unique(sbd_only["semantic"])) == {0, 12, 14}
    np.testing.assert_array_equal(np.flatnonzero(sbd_only["labels"]), [11, 13])


# ---------------------------------------------------------------------------------------------------
# ADE20K.

ADE = "ADEChallengeData2016"


def _write_ade(root) -> dict:
    """{split folder: [(name, image, raw annotation)]}: raw 0 ("other") and 1..150 in the annotation."""
    written = {}
    for folder, names in [("training", ["ADE_train_00000002", "ADE_train_00000001"]),
                          ("validation", ["ADE_val_00000001"])]:
        written[folder] = []
        for i, name in enumerate(names):
            image = _write_image(root / ADE / "images" / folder / f"{name}.jpg", seed=10 + i)
            raw = _label_map(0, 1 + i, 150 - i)
            Image.fromarray(raw).save(_mkdir(root / ADE / "annotations" / folder / f"{name}.png"))
            written[folder].append((name, image, raw))
    return written


def test_ade20k_reduces_zero_label(tmp_path):
    # No manual_dir given: TFDS's default, <data_dir>/downloads/manual.
    written = _write_ade(tmp_path / "downloads" / "manual")
    JaxsegAde20k(data_dir=tmp_path, num_workers=1).download_and_prepare(file_format=ARRAY_RECORD)
    train = _read("jaxseg_ade20k", tmp_path, "train")
    assert [e["image_id"] for e in train] == [b"ADE_train_00000001", b"ADE_train_00000002"]
    for split, folder in [("train", "training"), ("validation", "validation")]:
        examples = _read("jaxseg_ade20k", tmp_path, split)
        for example, (name, image, raw) in zip(examples, sorted(written[folder])):
            semantic = np.where(raw == 0, 255, raw - 1).astype(np.uint8)
            first, second = int(raw[2, 3]) - 1, int(raw[12, 15]) - 1
            _assert_semantic(example, image, semantic, _hot(150, first, second), name.encode())
    # ADE_train_00000002 has raw 1 -> 0, 150 -> 149, 0 -> 255.
    assert set(np.unique(train[1]["semantic"])) == {0, 149, 255}
    np.testing.assert_array_equal(np.flatnonzero(train[1]["labels"]), [0, 149])


# ---------------------------------------------------------------------------------------------------
# Cityscapes.

def _write_cityscapes(root) -> dict:
    """{split folder: [(name, image, labelIds)]} over two cities."""
    written = {}
    for folder, names in [("train", ["aachen_000001_000019", "aachen_000000_000019", "bremen_000000_000019"]),
                          ("val", ["lindau_000000_000019"])]:
        written[folder] = []
        for i, name in enumerate(names):
            city = name.split("_")[0]
            image = _write_image(root / "leftImg8bit" / folder / city / f"{name}_leftImg8bit.png", 20 + i)
            # 7 road -> 0, 33 bicycle -> 18, 26 car -> 13; 0 unlabeled and 9 parking -> 255.
            label_ids = _label_map(7, (33, 26, 9)[i % 3], 0)
            Image.fromarray(label_ids).save(
                _mkdir(root / "gtFine" / folder / city / f"{name}_gtFine_labelIds.png"))
            written[folder].append((name, image, label_ids))
    return written


def test_cityscapes_train_ids(tmp_path):
    manual = tmp_path / "manual"
    written = _write_cityscapes(manual)
    # The manual directory the TFDS way.
    JaxsegCityscapes(data_dir=tmp_path / "data", num_workers=1).download_and_prepare(
        file_format=ARRAY_RECORD, download_config=tfds.download.DownloadConfig(manual_dir=manual))
    train_ids = {7: 0, 33: 18, 26: 13, 9: 255, 0: 255}
    expected_labels = {33: _hot(19, 0, 18), 26: _hot(19, 0, 13), 9: _hot(19, 0)}
    for split, folder in [("train", "train"), ("validation", "val")]:
        examples = _read("jaxseg_cityscapes", tmp_path / "data", split)
        assert len(examples) == len(written[folder])
        for example, (name, image, label_ids) in zip(examples, sorted(written[folder])):
            semantic = np.vectorize(train_ids.get)(label_ids).astype(np.uint8)
            _assert_semantic(example, image, semantic, expected_labels[int(label_ids[2, 3])], name.encode())


# ---------------------------------------------------------------------------------------------------
# COCO panoptic.

THING_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})  # COCO's 80
STUFF_IDS = list(range(92, 145))  # 53 (the real ones are spread over 92..200)
CATEGORIES = ([{"id": c, "name": f"thing{c}", "isthing": 1, "supercategory": "x"} for c in THING_IDS]
              + [{"id": c, "name": f"stuff{c}", "isthing": 0, "supercategory": "y"} for c in STUFF_IDS])


def _rgb_ids(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def _coco_image(root, folder: str, image_id: int, segments: list[tuple], seed: int) -> tuple[dict, dict]:
    """One image: `segments` = [(segment id, COCO category, iscrowd, (row slice, col slice))], drawn in
    order on void; returns its json entries ("images", "annotations")."""
    name = f"{image_id:012d}"
    _write_image(root / folder / f"{name}.jpg", seed=seed)
    ids = np.zeros((H, W), np.int64)
    for segment_id, _, _, (rows, cols) in segments:
        ids[rows, cols] = segment_id
    info = [{"id": segment_id, "category_id": category, "iscrowd": crowd,
             "area": int((ids == segment_id).sum()),
             "bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]}
            for segment_id, category, crowd, (rows, cols) in segments]
    Image.fromarray(_rgb_ids(ids)).save(_mkdir(root / "annotations" / f"panoptic_{folder}" / f"{name}.png"))
    return ({"id": image_id, "file_name": f"{name}.jpg", "height": H, "width": W},
            {"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})


# A thing (person, 1 -> 0), a stuff region (92 -> 80), a crowd of a third category (3 -> 2) and void.
TRAIN_SEGMENTS = {
    139: [(3226956, 1, 0, (slice(0, 10), slice(0, 12))), (5, 92, 0, (slice(12, 24), slice(0, 32))),
          (65793, 3, 1, (slice(2, 8), slice(20, 30)))],
    9: [(7, 144, 0, (slice(0, 24), slice(0, 16))), (8, 90, 0, (slice(5, 15), slice(18, 26)))],
}
VAL_SEGMENTS = {785: [(1, 1, 0, (slice(0, 24), slice(0, 32)))], 632: []}


def _write_coco(root):
    (root / "annotations").mkdir(parents=True)
    for folder, table, seed in [("train2017", TRAIN_SEGMENTS, 30), ("val2017", VAL_SEGMENTS, 40)]:
        entries = [_coco_image(root, folder, image_id, segments, seed + i)
                   for i, (image_id, segments) in enumerate(table.items())]  # json order: not sorted
        (root / "annotations" / f"panoptic_{folder}.json").write_text(json.dumps({
            "images": [e[0] for e in entries], "annotations": [e[1] for e in entries],
            "categories": CATEGORIES}))


def test_coco_panoptic(tmp_path):
    manual = tmp_path / "manual"
    _write_coco(manual)
    JaxsegCocoPanoptic(manual_dir=manual, data_dir=tmp_path, num_workers=1).download_and_prepare(
        file_format=ARRAY_RECORD)
    contiguous = {c["id"]: index for index, c in enumerate(CATEGORIES)}
    for split, folder, table in [("train", "train2017", TRAIN_SEGMENTS),
                                 ("validation", "val2017", VAL_SEGMENTS)]:
        examples = _read("jaxseg_coco_panoptic", tmp_path, split)
        assert [e["image_id"] for e in examples] == sorted(table)
        for example in examples:
            image_id, segments = example["image_id"], table[example["image_id"]]
            name = f"{image_id:012d}"
            with Image.open(manual / folder / f"{name}.jpg") as image:
                np.testing.assert_array_equal(example["image"], np.asarray(image))
            ids = np.zeros((H, W), np.int32)
            semantic = np.full((H, W), 255, np.uint8)
            for segment_id, category, crowd, (rows, cols) in segments:
                ids[rows, cols] = segment_id
                semantic[rows, cols] = 255 if crowd else contiguous[category]
            np.testing.assert_array_equal(example["panoptic"], ids)
            assert example["panoptic"].dtype == np.int32
            np.testing.assert_array_equal(example["semantic"], semantic[..., None])
            table_read = {k: np.asarray(v) for k, v in example["segments"].items()}
            np.testing.assert_array_equal(table_read["id"], [s[0] for s in segments])
            np.testing.assert_array_equal(table_read["category_id"], [contiguous[s[1]] for s in segments])
            np.testing.assert_array_equal(table_read["is_thing"], [s[1] < 92 for s in segments])
            np.testing.assert_array_equal(table_read["iscrowd"], [bool(s[2]) for s in segments])
            np.testing.assert_array_equal(table_read["area"], [(ids == s[0]).sum() for s in segments])
            boxes = [[cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]
                     for _, _, _, (rows, cols) in segments]
            np.testing.assert_array_equal(table_read["bbox"].reshape(-1, 4), np.reshape(boxes, (-1, 4)))
            np.testing.assert_array_equal(example["labels"], _hot(133, *[contiguous[s[1]] for s in segments]))
    # Spelled out for image 139: thing 0, stuff 80; the crowd's category 2 is a label but no pixel.
    example = _read("jaxseg_coco_panoptic", tmp_path, "train")[1]
    assert example["image_id"] == 139
    assert set(np.unique(example["semantic"])) == {0, 80, 255}
    np.testing.assert_array_equal(np.flatnonzero(example["labels"]), [0, 2, 80])
    np.testing.assert_array_equal(example["segments"]["category_id"], [0, 80, 2])
    np.testing.assert_array_equal(example["segments"]["iscrowd"], [False, False, True])
    assert example["panoptic"][0, 0] == 3226956
    metadata = tfds.builder("jaxseg_coco_panoptic", data_dir=tmp_path).info.metadata["categories"]
    assert len(metadata) == 133
    assert metadata[0] == {"id": 0, "coco_id": 1, "name": "thing1", "isthing": True}
    assert metadata[80] == {"id": 80, "coco_id": 92, "name": "stuff92", "isthing": False}
    assert [c["coco_id"] for c in metadata] == THING_IDS + STUFF_IDS


# ---------------------------------------------------------------------------------------------------
# The manual directory: errors before anything is written.

def test_missing_manual_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="manual directory .*nowhere does not exist") as error:
        JaxsegAde20k(manual_dir=missing, data_dir=tmp_path / "data", num_workers=1).download_and_prepare(
            file_format=ARRAY_RECORD)
    assert "ADEChallengeData2016.zip" in str(error.value)
    assert "ADEChallengeData2016/images/training/<name>.jpg" in str(error.value)
    assert _files(tmp_path / "data") == []
    # The default directory is named when none is given.
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "downloads" / "manual")):
        JaxsegAde20k(data_dir=tmp_path / "data", num_workers=1).download_and_prepare(file_format=ARRAY_RECORD)


def test_missing_files(tmp_path):
    manual = tmp_path / "manual"
    _write_voc(manual)
    mat = manual / SBD / "cls" / "2009_000006.mat"
    mat.unlink()
    with pytest.raises(FileNotFoundError, match=f"expected {mat}, from benchmark.tgz"):
        JaxsegVoc(manual_dir=manual, data_dir=tmp_path / "data", num_workers=1).download_and_prepare(
            file_format=ARRAY_RECORD)
    assert _files(tmp_path / "data") == []

    _write_coco(tmp_path / "coco")
    folder = tmp_path / "coco" / "annotations" / "panoptic_val2017"
    for png in folder.iterdir():
        png.unlink()
    folder.rmdir()
    message = f"expected {folder}/000000000632.png, from annotations/panoptic_val2017.zip, inside panoptic_"
    with pytest.raises(FileNotFoundError, match=message):
        JaxsegCocoPanoptic(manual_dir=tmp_path / "coco", data_dir=tmp_path / "data").download_and_prepare(
            file_format=ARRAY_RECORD)

    (manual / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no \\*/\\*_leftImg8bit.png in {manual}/leftImg8bit/train"):
        JaxsegCityscapes(manual_dir=manual, data_dir=tmp_path / "data").download_and_prepare(
            file_format=ARRAY_RECORD)
    assert _files(tmp_path / "data") == []


def test_manual_dir_given_twice(tmp_path):
    with pytest.raises(ValueError, match="manual_dir given twice"):
        JaxsegVoc(manual_dir=tmp_path / "a", data_dir=tmp_path).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "b"))
