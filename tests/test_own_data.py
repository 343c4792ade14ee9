"""Your own data (`jaxseg.data.builders.folder`, docs/own_data.md): small folders in each layout (index and
palette label PNGs, mmsegmentation folder names, COCO panoptic, image-level labels from JSON, CSV and the
masks) built to ArrayRecord and read back through `DataConfig` equal to what was written; every layout
mistake is one `UserError` naming the file and the rule, with nothing written; the configs take a folder
dataset with `--set`, `DataConfig.check_classes` refuses class counts that do not fit it, and a semantic
and a panoptic runlocal config train on folders exported from the generated scenes."""
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxseg import methods
from jaxseg.cli import make_dataset
from jaxseg.config import apply_overrides, load_config
from jaxseg.data.builders.coco_panoptic import category_table
from jaxseg.data.builders.folder import FolderConfig, JaxsegFolder, export_scenes, split_name
from jaxseg.data.builders.scenes import VALIDATION_OFFSET, scenes_config
from jaxseg.data.datasets import DataConfig
from jaxseg.data.synthetic import categories, generate_scene
from jaxseg.errors import UserError
from jaxseg.runs import sections
from jaxseg.train.main import train_and_evaluate
from jaxseg.visualize import label_png, panoptic_png

H, W = 12, 16
CLASSES = ("sky", "road", "car")


def _write_image(path, seed: int, size=(H, W)) -> np.ndarray:
    """A random RGB image (JPEG or PNG by the suffix); returns what PIL decodes from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _write_label(path, label: np.ndarray, palette: bool = False) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    (label_png(label) if palette else Image.fromarray(label, mode="L")).save(path)
    return label


def _label(seed: int, num_classes: int, size=(H, W)) -> np.ndarray:
    label = np.random.default_rng(seed).integers(0, num_classes, size).astype(np.uint8)
    label[0, :3] = 255
    return label


def _semantic_folder(root, *, images="images", labels="labels", splits=("train", "val"), palette=False,
                     classes=CLASSES, labelled=("train", "val")) -> dict:
    """classes.txt and one JPEG + one PNG image per split with label PNGs (only in the `labelled` splits);
    returns {split folder: {stem: (image, label)}}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    written = {}
    for s, split in enumerate(splits):
        written[split] = {}
        for k, suffix in enumerate((".jpg", ".png")):
            stem = f"{split}_{k}"
            image = _write_image(root / images / split / f"{stem}{suffix}", 10 * s + k)
            label = _label(10 * s + k, len(classes))
            if split in labelled:
                _write_label(root / labels / split / f"{stem}.png", label, palette)
            written[split][stem] = (image, label)
    return written


def _build(root, data_dir, name="mine", **settings) -> JaxsegFolder:
    builder = JaxsegFolder(config=FolderConfig(name=name, root=str(root), **settings), data_dir=str(data_dir),
                           num_workers=1)
    builder.download_and_prepare(file_format="array_record", download_dir=str(data_dir / "downloads"))
    return builder


def _read(name, data_dir, splits=("train", "validation"), ground_truth="categories") -> dict:
    data = DataConfig(name=f"jaxseg_folder/{name}", data_dir=str(data_dir), ground_truth=ground_truth)
    sources = data.sources(list(splits), workdir="unused")
    return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


def _hot(num: int, present) -> np.ndarray:
    out = np.zeros(num, np.uint8)
    out[list(present)] = 1
    return out


def test_split_folder_names():
    assert [split_name(n) for n in ("train", "training", "val", "validation", "val2017", "train2017", "test")] == \
        ["train", "train", "validation", "validation", "validation", "train", "test"]


def test_semantic_index_pngs_read_back_as_written(tmp_path):
    written = _semantic_folder(tmp_path / "mine")
    _build(tmp_path / "mine", tmp_path / "data")
    read = _read("mine", tmp_path / "data")
    for split, folder in (("train", "train"), ("validation", "val")):
        assert [e["image_id"].decode() for e in read[split]] == sorted(written[folder])
        for example in read[split]:
            image, label = written[folder][example["image_id"].decode()]
            np.testing.assert_array_equal(example["image"], image)
            np.testing.assert_array_equal(example["semantic"][..., 0], label)
            np.testing.assert_array_equal(example["labels"], _hot(3, set(np.unique(label)) - {255}))
    data = DataConfig(name="jaxseg_folder/mine", data_dir=str(tmp_path / "data"))
    assert data.class_names() == list(CLASSES) and data.class_names("wsss") == ["background", *CLASSES]
    # Opening it: the split must exist, the label space match, a manual_dir be the folder it came from.
    with pytest.raises(UserError, match=r"has no split\(s\) \['test'\]; valid: \['train', 'validation'\]"):
        data.sources(["test"], "unused")
    with pytest.raises(UserError, match="built in label space 'categories'.*data.ground_truth='wsss'"):
        DataConfig(name="jaxseg_folder/mine", data_dir=str(tmp_path / "data"),
                   ground_truth="wsss").sources(["train"], "")
    with pytest.raises(UserError, match=f"was built from {tmp_path / 'mine'}, not data.manual_dir="):
        DataConfig(name="jaxseg_folder/mine", data_dir=str(tmp_path / "data"),
                   manual_dir=str(tmp_path)).sources(["train"], "")
    with pytest.raises(FileNotFoundError, match="jaxseg-make-dataset folder --root FOLDER .* --name other"):
        DataConfig(name="jaxseg_folder/other", data_dir=str(tmp_path / "data")).sources(["train"], "")
    with pytest.raises(UserError, match="the name after jaxseg_folder/ must match"):
        DataConfig(name="jaxseg_folder/a b")


def test_palette_pngs_mmseg_folders_and_a_background_class(tmp_path):
    classes = ("background", *CLASSES)
    written = _semantic_folder(tmp_path / "voc_like", images="img_dir", labels="ann_dir", palette=True,
                               classes=classes)
    (tmp_path / "voc_like" / "classes.txt").unlink()
    (tmp_path / "voc_like" / "classes.json").write_text(json.dumps(classes))
    with Image.open(next((tmp_path / "voc_like" / "ann_dir" / "train").iterdir())) as png:
        assert png.mode == "P"
    _build(tmp_path / "voc_like", tmp_path / "data", label_space="wsss")
    read = _read("mine", tmp_path / "data", ground_truth="wsss")
    for example in read["train"] + read["validation"]:
        folder = "train" if example["image_id"].startswith(b"train") else "val"
        label = written[folder][example["image_id"].decode()][1]
        np.testing.assert_array_equal(example["semantic"][..., 0], label)  # the palette indices
        # The background is no image-level class: class c at index c - 1, as VOC.
        np.testing.assert_array_equal(example["labels"], _hot(4, set(np.unique(label)) - {255})[1:])
    data = DataConfig(name="jaxseg_folder/mine", data_dir=str(tmp_path / "data"), ground_truth="wsss")
    assert data.class_names() == list(classes) and data.class_names("categories") == list(CLASSES)


def test_image_level_labels_from_json_csv_and_masks(tmp_path):
    """The training split has images only (weak supervision); its labels come from the file, the
    validation split's from its masks."""
    root = tmp_path / "weak"
    written = _semantic_folder(root, labelled=("val",))
    (root / "image_labels.json").write_text(json.dumps({"train_0": ["car"], "train_1.png": [0, "road"]}))
    _build(root, tmp_path / "data")
    read = _read("mine", tmp_path / "data")
    expected = {b"train_0": _hot(3, [2]), b"train_1": _hot(3, [0, 1])}
    for example in read["train"]:
        np.testing.assert_array_equal(example["labels"], expected[example["image_id"]])
        assert (example["semantic"] == 255).all() and example["semantic"].shape == (H, W, 1)
    for example in read["validation"]:
        label = written["val"][example["image_id"].decode()][1]
        np.testing.assert_array_equal(example["labels"], _hot(3, set(np.unique(label)) - {255}))
    # The same as CSV (a header, several classes in one cell or in several), given by path.
    (root / "image_labels.json").unlink()
    (tmp_path / "tags.csv").write_text("image,labels\ntrain_0,car\ntrain_1,sky;road\n")
    _build(root, tmp_path / "data", name="csv", image_labels=str(tmp_path / "tags.csv"))
    for example in _read("csv", tmp_path / "data", splits=("train",))["train"]:
        np.testing.assert_array_equal(example["labels"], expected[example["image_id"]])


def _scenes_pair(example, scene, position):
    np.testing.assert_array_equal(example["image"], scene["image"])
    np.testing.assert_array_equal(example["semantic"][..., 0], scene["semantic"])
    np.testing.assert_array_equal(example["labels"], scene["labels"])
    assert example["image_id"] == f"scene_{position:06d}".encode()


def test_exported_scenes_build_back_to_the_scenes_in_both_layouts(tmp_path):
    """export_scenes -> folder -> records: equal to the generator's scenes (the jaxseg_scenes examples),
    segment tables included; the panoptic categories come out things first whatever the json's order."""
    config = scenes_config(image_size=32, num_train=3, num_val=2)
    for layout in ("semantic", "coco_panoptic"):
        export_scenes(tmp_path / layout, layout, image_size=32, num_train=3, num_val=2)
        _build(tmp_path / layout, tmp_path / "data", name=layout)
    panoptic_json = tmp_path / "coco_panoptic" / "panoptic_train.json"
    document = json.loads(panoptic_json.read_text())
    things = [c for c in document["categories"] if c["isthing"]]
    document["categories"] = [c for c in document["categories"] if not c["isthing"]] + things  # stuff first
    panoptic_json.write_text(json.dumps(document))
    (tmp_path / "coco_panoptic" / "panoptic_val.json").unlink()
    _build(tmp_path / "coco_panoptic", tmp_path / "data", name="reordered")
    for layout in ("semantic", "coco_panoptic", "reordered"):
        read = _read(layout, tmp_path / "data", splits=("train",) if layout == "reordered" else ("train", "validation"))
        for split, first in (("train", 0), ("validation", VALIDATION_OFFSET)):
            for position, example in enumerate(read.get(split, [])):
                scene = generate_scene(config.scene, first + position)
                _scenes_pair(example, scene, position)
                if layout != "semantic":
                    np.testing.assert_array_equal(example["panoptic"], scene["panoptic"])
                    for key, values in scene["segments"].items():
                        np.testing.assert_array_equal(np.asarray(example["segments"][key]).reshape(values.shape),
                                                      values, err_msg=key)
        data = DataConfig(name=f"jaxseg_folder/{layout}", data_dir=str(tmp_path / "data"))
        assert data.class_names() == [c["name"] for c in categories(config.scene)]
    table = category_table([{"id": 7, "name": "grass", "isthing": 0}, {"id": 3, "name": "cat", "isthing": 1},
                            {"id": 1, "name": "sky", "isthing": 0}, {"id": 9, "name": "dog", "isthing": 1}], "t")
    assert [(c["id"], c["coco_id"], c["isthing"]) for c in table] == [(0, 3, True), (1, 9, True), (2, 7, False),
                                                                      (3, 1, False)]


# ---------------------------------------------------------------------------------------------------
# Layout mistakes: one UserError naming the file and the rule, nothing written.

def _remove(path):
    path.unlink()


def _semantic_case(change, match):
    def case(root):
        _semantic_folder(root)
        change(root)
        return match
    return case


def _panoptic_case(change, match):
    def case(root):
        export_scenes(root, "coco_panoptic", image_size=32, num_train=2, num_val=1)
        change(root)
        return match
    return case


def _edit_json(root, edit):
    path = root / "panoptic_train.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _one_pixel_segment(root):
    ids = np.asarray(Image.open(root / "panoptic_train" / "scene_000000.png").convert("RGB"), np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    ids[0, 0] = 77
    panoptic_png(ids).save(root / "panoptic_train" / "scene_000000.png")


LAYOUT_ERRORS = {
    "missing label": _semantic_case(
        lambda r: _remove(r / "labels" / "train" / "train_1.png"),
        r"images/train/train_1.png has no label map: expected .*labels/train/train_1.png"),
    "missing image": _semantic_case(
        lambda r: _write_label(r / "labels" / "val" / "extra.png", _label(0, 3)),
        r"labels/val/extra.png has no image: expected .*images/val/extra"),
    "size mismatch": _semantic_case(
        lambda r: _write_label(r / "labels" / "train" / "train_0.png", _label(0, 3, (5, 7))),
        r"labels/train/train_0.png is 5x7 \(HxW\) but its image .*train_0.jpg is 12x16: a label map must have"),
    "label beyond the classes": _semantic_case(
        lambda r: _write_label(r / "labels" / "val" / "val_1.png", np.full((H, W), 3, np.uint8)),
        r"labels/val/val_1.png holds label 3, beyond the 3 classes of .*classes.txt \(values 0..2, 255 = ignore\)"),
    "classes file with a gap": _semantic_case(
        lambda r: (r / "classes.txt").write_text("sky\n\nroad\ncar\n"),
        r"classes file .*classes.txt: class 1 has no name"),
    "classes file repeating a name": _semantic_case(
        lambda r: (r / "classes.txt").write_text("sky\nroad\nsky\n"),
        r"classes file .*classes.txt names \['sky'\] more than once"),
    "classes file not JSON": _semantic_case(
        lambda r: (_remove(r / "classes.txt"), (r / "classes.json").write_text("['sky', 'road']")),
        r"classes file .*classes.json is not valid JSON"),
    "no classes file": _semantic_case(lambda r: _remove(r / "classes.txt"), r"has no classes.txt"),
    "unreadable image": _semantic_case(
        lambda r: (r / "images" / "val" / "val_1.png").write_bytes(b"not a png"),
        r"cannot read image .*images/val/val_1.png"),
    "16-bit image": _semantic_case(
        lambda r: Image.fromarray(np.zeros((H, W), np.uint16)).save(r / "images" / "val" / "val_1.png"),
        r"image .*images/val/val_1.png has PIL mode I;16 .*give 8-bit images"),
    "JPEG label": _semantic_case(
        lambda r: Image.new("L", (W, H)).save(r / "labels" / "val" / "val_0.jpg"),
        r"labels/val/val_0.jpg is not a PNG"),
    "unknown image-level class": _semantic_case(
        lambda r: (r / "image_labels.json").write_text(json.dumps({"train_0": ["boat"]})),
        r"image_labels.json: 'train_0' lists class 'boat'; give one of the class names or ids 0..2"),
    "image-level labels of no image": _semantic_case(
        lambda r: (r / "image_labels.json").write_text(json.dumps({"nowhere": [1]})),
        r"image_labels.json lists 'nowhere', which is no image of any split"),
    "split without labels or image-level labels": _semantic_case(
        lambda r: shutil.rmtree(r / "labels" / "val"),
        r"images/val/val_0.jpg has no labels: neither a label map .*labels/val/val_0.png nor an entry"),
    "panoptic segment id without its entry": _panoptic_case(
        _one_pixel_segment, r"panoptic_train/scene_000000.png holds segment id 77, which .*panoptic_train.json "
                            r"does not list"),
    "panoptic category beyond the categories": _panoptic_case(
        lambda r: _edit_json(r, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99)),
        r"panoptic_train.json, scene_000001.png: segment 1 has category_id 99, which is not one of the json's "
        r"categories"),
    "panoptic PNG missing": _panoptic_case(
        lambda r: _remove(r / "panoptic_val" / "scene_000000.png"),
        r"the panoptic PNG .*panoptic_val/scene_000000.png of image_id 0 does not exist"),
    "panoptic size mismatch": _panoptic_case(
        lambda r: Image.new("RGB", (8, 8)).save(r / "images" / "val" / "scene_000000.png"),
        r"panoptic_val/scene_000000.png is 32x32 \(HxW\) but its image .*scene_000000.png is 8x8"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_ERRORS))
def test_layout_mistakes_name_the_file_and_write_nothing(case, tmp_path):
    match = LAYOUT_ERRORS[case](tmp_path / "folder")
    with pytest.raises(UserError, match=match):
        _build(tmp_path / "folder", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_the_tool_reports_a_layout_mistake_as_one_line(tmp_path, capsys):
    _semantic_folder(tmp_path / "folder")
    _write_label(tmp_path / "folder" / "labels" / "val" / "val_0.png", np.full((H, W), 9, np.uint8))
    args = ["folder", "--root", str(tmp_path / "folder"), "--data_dir", str(tmp_path / "data"), "--workers", "1"]
    assert make_dataset.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_0.png holds label 9, beyond the 3 classes" in err[0], err
    assert not (tmp_path / "data").exists()


def test_the_tool_reuses_a_build_refuses_other_options_and_rebuilds_only_a_sound_folder(tmp_path, capsys):
    root, data_dir = tmp_path / "mine", tmp_path / "data"
    written = _semantic_folder(root)
    args = ["folder", "--root", str(root), "--data_dir", str(data_dir), "--workers", "1"]
    assert make_dataset.main(args) == 0 and "built in" in capsys.readouterr().out
    assert make_dataset.main(args) == 0 and "already built" in capsys.readouterr().out
    (tmp_path / "tags.json").write_text(json.dumps({"train_0": ["car"]}))
    other = [*args, "--image_labels", str(tmp_path / "tags.json")]
    assert make_dataset.main(other) == 2 and "image_labels: '' there" in capsys.readouterr().err
    _write_label(root / "labels" / "val" / "val_0.png", np.full((H, W), 7, np.uint8))
    assert make_dataset.main([*other, "--overwrite"]) == 2 and "holds label 7" in capsys.readouterr().err
    first = _read("mine", data_dir, splits=("train",))["train"][0]  # the old build is still there
    np.testing.assert_array_equal(first["labels"], _hot(3, set(np.unique(written["train"]["train_0"][1])) - {255}))
    _write_label(root / "labels" / "val" / "val_0.png", written["val"]["val_0"][1])
    assert make_dataset.main([*other, "--overwrite"]) == 0
    np.testing.assert_array_equal(_read("mine", data_dir, splits=("train",))["train"][0]["labels"], _hot(3, [2]))


# ---------------------------------------------------------------------------------------------------
# The configs on folder datasets exported from the scenes (the docs' commands, in-process).

@pytest.fixture(scope="module")
def scenes_folders(tmp_path_factory):
    """The 64 px scenes (4 train, 2 val) exported in both layouts and built with the tool."""
    root = tmp_path_factory.mktemp("own")
    for layout in ("semantic", "coco_panoptic"):
        assert make_dataset.main(["export-scenes", "--out", str(root / layout), "--layout", layout,
                                  "--num_train", "4", "--num_val", "2"]) == 0
        assert make_dataset.main(["folder", "--root", str(root / layout), "--data_dir", str(root / "data"),
                                  "--workers", "1"]) == 0
    return root


SCRATCH = "pretrained.config="  # a few steps from scratch: no pretraining to build
# config, its --set for the exported scenes (9 classes, 6 things), and the classes the model predicts in its
# label space, as `train_and_evaluate` passes them to `DataConfig.check_classes`.
CONFIGS = {
    "eomt semantic": ("configs/eomt/ade20k_semantic.py:runlocal", "semantic", ["model.num_classes=9"]),
    "eomt panoptic": ("configs/eomt/coco_panoptic.py:runlocal", "coco_panoptic",
                      ["model.num_classes=9", "method.num_things=6"]),
    "eomt instance": ("configs/eomt/coco_instance.py:runlocal", "coco_panoptic",
                      ["model.num_classes=6", "method.num_things=6"]),
    "segmenter": ("configs/segmenter/scenes.py:runlocal,linear", "semantic", ["model.num_classes=7", SCRATCH]),
    "weaktr": ("configs/weaktr/scenes_cam.py:runlocal", "semantic", ["model.num_classes=6", SCRATCH]),
}


def _config(spec, layout, root, *overrides):
    config = load_config(spec)
    apply_overrides(config, [f"data.name=jaxseg_folder/{layout}", f"data.data_dir={root / 'data'}",
                             "train.num_overlays=0", *overrides])
    return config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_take_a_folder_dataset_and_its_class_counts_are_checked(name, scenes_folders):
    spec, layout, overrides = CONFIGS[name]
    config = _config(spec, layout, scenes_folders, *overrides)
    parts = sections(config)
    source = parts.data.sources([parts.data.train_split], "unused")[parts.data.train_split]
    parts.data.check_classes(source, **methods.build(config, parts.data).class_counts())
    wrong = {"eomt semantic": ("model.num_classes=8", "the model predicts 8 classes, dataset jaxseg_folder/semantic "
                                                      "has 9"),
             "eomt panoptic": ("method.num_things=5", "method.num_things=5, but dataset jaxseg_folder/coco_panoptic "
                                                      "has 6 thing categories"),
             "eomt instance": ("model.num_classes=7", "the model predicts 7, dataset jaxseg_folder/coco_panoptic has "
                                                      "6 thing categories of 9"),
             "segmenter": ("model.num_classes=11", "the model's 10 foreground classes .* must be 1 to the 9 "
                                                   "categories"),
             "weaktr": ("model.num_classes=10", "the model's 10 foreground classes")}[name]
    config = _config(spec, layout, scenes_folders, *overrides, wrong[0])
    if name == "weaktr":
        apply_overrides(config, ["model.encoder.num_cls_tokens=10"])
    with pytest.raises(UserError, match=wrong[1]):
        parts.data.check_classes(source, **methods.build(config, parts.data).class_counts())


def test_training_refuses_a_model_whose_classes_do_not_fit_the_dataset(scenes_folders, tmp_path):
    spec, layout, overrides = CONFIGS["eomt semantic"]
    config = _config(spec, layout, scenes_folders, *overrides, "model.num_classes=8")
    with pytest.raises(UserError, match="the model predicts 8 classes, dataset jaxseg_folder/semantic has 9"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eomt semantic", "eomt panoptic"])
def test_runlocal_configs_train_on_folder_datasets(name, scenes_folders, tmp_path):
    spec, layout, overrides = CONFIGS[name]
    workdir = tmp_path / "run"
    result = train_and_evaluate(_config(spec, layout, scenes_folders, *overrides), workdir)
    assert result["step"] == 6 and result["val"]["examples"] == 2
    losses = [json.loads(line)["loss"] for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(loss) for loss in losses)
    keys = ("mean_iou", "PQ") if layout == "coco_panoptic" else ("mean_iou",)
    assert all(math.isfinite(result["val"][key]) for key in keys), result
