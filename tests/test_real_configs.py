"""The configs of the real benchmarks (EoMT over DINOv2 and DINOv3 on COCO panoptic / instance, ADE20K,
Cityscapes; WeakTr on VOC and COCO) in their runlocal form, end to end on tiny fake datasets in the
official layouts (the writers of test_builders.py): prepared from `dataset.manual_dir` on first use,
trained a few steps, evaluated with each method's metric. Numbers are not meaningful at this size; the
plumbing is what is checked (label spaces, splits, segment tables, variable image sizes, metric keys)."""
import json

import numpy as np
import pytest
from PIL import Image
from test_builders import _write_ade, _write_cityscapes, _write_coco, _write_voc

from jaxseg.config import apply_overrides, load_config
from jaxseg.data.datasets import image_name, manual_sources
from jaxseg.train.main import train_and_evaluate

WRITERS = {"jaxseg_voc": _write_voc, "jaxseg_ade20k": _write_ade, "jaxseg_cityscapes": _write_cityscapes,
           "jaxseg_coco_panoptic": _write_coco}


@pytest.fixture(scope="module")
def manual_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloads")
    for name, write in WRITERS.items():
        write(root / name)
    return root


def _run(spec, workdir, manual_dirs, data_dir, *overrides):
    config = load_config(spec)
    name = config.data.name
    apply_overrides(config, [f"data.data_dir={data_dir}", f"data.manual_dir={manual_dirs / name}",
                             "train.num_overlays=0", *overrides])
    results = train_and_evaluate(config, workdir)
    return dict(results["val"], step=results["step"])


@pytest.mark.parametrize("spec,keys", [
    ("configs/eomt/coco_panoptic.py:runlocal", ("PQ", "PQ_things", "PQ_stuff", "mean_iou")),
    ("configs/eomt/coco_instance.py:runlocal", ("AP", "AP50")),
    ("configs/eomt/ade20k_semantic.py:runlocal", ("mean_iou",)),
    ("configs/eomt/cityscapes_semantic.py:runlocal", ("mean_iou",)),
    # DINOv3 (RoPE): its instance and ADE20K configs differ only in sections that test_configs.py builds.
    ("configs/eomt/coco_panoptic_dinov3.py:runlocal", ("PQ", "PQ_things", "PQ_stuff", "mean_iou")),
    ("configs/weaktr/voc_cam.py:runlocal", ("cam_miou", "best_threshold")),
    ("configs/weaktr/coco_cam.py:runlocal", ("cam_miou", "best_threshold")),
])
def test_runlocal_trains_and_evaluates(spec, keys, manual_dirs, tmp_path_factory):
    data_dir = tmp_path_factory.getbasetemp() / "data"  # prepared once per dataset, shared
    result = _run(spec, tmp_path_factory.mktemp("run"), manual_dirs, data_dir)
    assert result["step"] > 0 and result["examples"] > 0
    for key in keys:  # None: undefined (e.g. PQ_stuff when the fake val split has no stuff)
        assert result[key] is None or np.isfinite(result[key]), (key, result)


@pytest.mark.parametrize("spec", ["configs/weaktr/voc_seg.py:runlocal", "configs/weaktr/coco_seg.py:runlocal"])
def test_stage_two_trains_on_pseudo_labels_named_by_image(spec, manual_dirs, tmp_path_factory):
    data_dir = tmp_path_factory.getbasetemp() / "data"
    config = load_config(spec)
    train = manual_sources(config.data.name, data_dir, [config.data.train_split],
                           manual_dir=manual_dirs / config.data.name)[config.data.train_split]
    pseudo = tmp_path_factory.mktemp("pseudo")
    for i in range(len(train)):  # every pixel background except a block of class 1
        example = train[i]
        label = np.zeros(example["image"].shape[:2], np.uint8)
        label[:8, :8] = 1
        Image.fromarray(label).save(pseudo / f"{image_name(example, i)}.png")
    workdir = tmp_path_factory.mktemp("run")
    result = _run(spec, workdir, manual_dirs, data_dir, f"data.pseudo_labels_dir={pseudo}")
    assert np.isfinite(result["mean_iou"]) and result["step"] == config.train.total_steps
    logged = [json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
    assert all(0 < entry["kept_fraction"] <= 1 for entry in logged)


def test_real_recipes_want_pretrained_weights(tmp_path):
    config = load_config("configs/eomt/ade20k_semantic.py:L")
    with pytest.raises(ValueError, match="fine-tunes pretrained weights"):
        train_and_evaluate(config, tmp_path / "run")


def test_unprepared_dataset_says_how_to_build_it(tmp_path):
    config = load_config("configs/eomt/ade20k_semantic.py:runlocal")
    apply_overrides(config, [f"data.data_dir={tmp_path / 'empty'}"])
    with pytest.raises(FileNotFoundError, match="tools/make_dataset.py ade20k --manual_dir"):
        train_and_evaluate(config, tmp_path / "run")


def test_make_dataset_prepares_an_official_dataset(manual_dirs, tmp_path, capsys):
    from jaxseg.cli import make_dataset

    args = ["cityscapes", "--manual_dir", str(manual_dirs / "jaxseg_cityscapes"), "--data_dir", str(tmp_path),
            "--workers", "1"]
    assert make_dataset.main(args) == 0
    assert "built in" in capsys.readouterr().out
    assert make_dataset.main(args) == 0 and "already built" in capsys.readouterr().out
    assert len(manual_sources("jaxseg_cityscapes", tmp_path, ["train"])["train"]) == 3
    missing = ["voc", "--manual_dir", str(tmp_path / "nowhere"), "--data_dir", str(tmp_path / "voc")]
    assert make_dataset.main(missing) == 2
    assert "nowhere" in capsys.readouterr().err
