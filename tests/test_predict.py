"""Prediction files (`jaxseg.visualize`, tools/predict.py), standalone evaluation (tools/eval.py) and the
overlays `train_and_evaluate` writes, on tiny runs of the three tasks trained for a few steps (the
numbers are those of nearly untrained models: the tests check plumbing and file formats)."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxseg.train.run import apply_overrides, build_task, dataset_sources, load_config, load_run, train_and_evaluate
from jaxseg.visualize import label_png, overlay, panoptic_overlay, panoptic_png, voc_palette, write_predictions

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["dataset.num_train=16", "dataset.num_val=4", "dataset.image_size=32", "crop_size=32", "batch_size=4",
        "model.encoder.width=32", "model.encoder.mlp_dim=64", "model.encoder.num_heads=2",
        "model.encoder.depth=2", "num_overlays=2"]
RUNS = {
    "eomt": ("configs/eomt/scenes.py:runlocal",
             ["total_steps=6", "log_every=6", "warmup=(1, 1)", "model.num_queries=8", "num_points=64"]),
    "weaktr_cam": ("configs/weaktr/scenes_cam.py:runlocal",
                   ["total_steps=2", "log_every=2", "steps_per_epoch=1", "model.reduction=2"]),
    "segmenter": ("configs/segmenter/scenes.py:runlocal",
                  ["total_steps=2", "log_every=2", "base_size=35", "model.decoder_heads=2",
                   "model.decoder_mlp_dim=64"]),
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"jaxseg_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> run directory, each trained once (all on one shared scenes build)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}

    def get(name):
        if name not in runs:
            spec, overrides = RUNS[name]
            config = load_config(str(ROOT / spec))
            apply_overrides(config, TINY + overrides + [f"dataset.data_dir={root / 'data'}"])
            train_and_evaluate(config, root / name)
            runs[name] = root / name
        return runs[name]
    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Non-square images in the forms predict.py converts: RGB PNG, grayscale JPEG, RGBA PNG."""
    directory = tmp_path_factory.mktemp("images")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 32, 3), np.uint8)
    Image.fromarray(rgb).save(directory / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(directory / "gray.jpg")
    rgba = np.concatenate([rgb, np.full((40, 32, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(directory / "rgba.png")
    return directory


def _decode_panoptic(png: Image.Image) -> np.ndarray:
    rgb = np.asarray(png, np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


@pytest.mark.parametrize("name", list(RUNS))
def test_predict_writes_what_infer_returns(trained, images, tmp_path, name):
    run = trained(name)
    out, predict = tmp_path / "out", _tool("predict")
    assert predict.main(["--workdir", str(run), "--images", str(images), "--out_dir", str(out)]) == 0
    _, task, params = load_run(run)
    for stem in ("rgb", "gray", "rgba"):
        image = predict.read_image(next(images.glob(f"{stem}.*")))
        assert image.shape == (40, 32, 3) and image.dtype == np.uint8
        expected = task.infer(params, image)
        semantic = Image.open(out / f"{stem}_semantic.png")
        assert semantic.mode == "P"
        np.testing.assert_array_equal(np.asarray(semantic), expected["semantic"])
        assert Image.open(out / f"{stem}_overlay.png").size == (32, 40)
        if name == "eomt":  # the scenes EoMT is panoptic
            panoptic = _decode_panoptic(Image.open(out / f"{stem}_panoptic.png"))
            np.testing.assert_array_equal(panoptic, expected["panoptic"])
            assert json.loads((out / f"{stem}_segments.json").read_text()) == expected["segments"]
            assert Image.open(out / f"{stem}_panoptic_overlay.png").size == (32, 40)
        cams = {int(p.stem.rsplit("_", 1)[1]) for p in out.glob(f"{stem}_cam_*.png")}
        if name == "weaktr_cam":  # no labels: the classes the model predicts present
            assert cams == set(np.flatnonzero(task.predicted_labels(params, image)))
            assert expected["cams"].shape == (task.num_classes, 40, 32)
        else:
            assert not cams


@pytest.mark.parametrize("name", list(RUNS))
def test_train_and_evaluate_writes_overlays_of_the_eval_split(trained, name):
    run = trained(name)
    config, task, params = load_run(run)
    overlays = run / "overlays" / f"step_{config.total_steps}"
    source = dataset_sources(config, run)[config.dataset.eval_split]
    for index in range(2):
        example = source[index]
        image_id = int(example["image_id"])
        expected = task.infer(params, np.asarray(example["image"]), np.asarray(example["labels"]))
        np.testing.assert_array_equal(np.asarray(Image.open(overlays / f"{image_id}_semantic.png")),
                                      expected["semantic"])
        if name == "weaktr_cam":  # the dataset's image-level labels choose the CAMs
            cams = {int(p.stem.rsplit("_", 1)[1]) for p in overlays.glob(f"{image_id}_cam_*.png")}
            assert cams == set(np.flatnonzero(example["labels"][:task.num_classes]))
    assert len({p.name.split("_")[0] for p in overlays.iterdir()}) == 2  # num_overlays


def test_predict_refuses_to_overwrite_and_names_bad_images(trained, images, tmp_path, capsys):
    run, predict = trained("segmenter"), _tool("predict")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert predict.main(["--workdir", str(run), "--images", str(images), "--out_dir", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert predict.main(["--workdir", str(run), "--images", str(bad), "--out_dir", str(tmp_path / "b")]) == 1
    assert f"cannot read image {bad}" in capsys.readouterr().err

    assert predict.main(["--workdir", str(run), "--dataset_split", "validation", "--limit", "1",
                         "--out_dir", str(tmp_path / "split")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["1000000000_overlay.png",
                                                                       "1000000000_semantic.png"]
    _, task, params = load_run(run)
    item = [("1000000000", np.zeros((32, 32, 3), np.uint8), None)]
    with pytest.raises(FileExistsError, match="1000000000_semantic.png"):  # nor does the library
        write_predictions(task, params, item, tmp_path / "split")


def test_eval_tool_reports_what_task_evaluate_gives(trained):
    run = trained("segmenter")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--workdir", str(run)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((run / "eval_validation_step2.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == written
    logged = json.loads((run / "eval_validation_metrics.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 2 and logged["mean_iou"] == written["mean_iou"]

    config, _, params = load_run(run)
    task = build_task(config, dataset_sources(config, run))
    from jaxseg.parallel import make_mesh
    mesh = make_mesh(tuple(map(tuple, config.mesh)))
    expected = task.evaluate(params, mesh, tuple(config.sharding_rules))
    assert written == dict(expected, step=2, split="validation")

    evaluate_run = _tool("eval").evaluate_run
    with pytest.raises(FileExistsError, match="eval_validation_step2.json"):
        evaluate_run(run, None, [], None, False)
    with pytest.raises(ValueError, match="the model is the checkpoint's"):
        evaluate_run(run, None, ["model.num_classes=3"], None, True)


def test_visualize_rejects_what_a_png_cannot_hold():
    image = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="0..255"):
        label_png(np.full((2, 3), 256))
    with pytest.raises(ValueError, match=r"the prediction is \(2, 2\)"):
        overlay(image, np.zeros((2, 2), np.int32))
    ids = np.array([[0, 1, 70000], [70000, 70000, 1]])
    np.testing.assert_array_equal(_decode_panoptic(panoptic_png(ids)), ids)


def test_panoptic_overlay_gives_each_thing_its_colour_and_stuff_its_category_colour():
    ids = np.repeat(np.repeat([[0, 1, 2, 3]], 2, 0), 2, 1)  # 2x8: void, two things of one class, stuff
    segments = [{"id": 1, "category_id": 2, "is_thing": True, "score": 0.9},
                {"id": 2, "category_id": 2, "is_thing": True, "score": 0.8},
                {"id": 3, "category_id": 7, "is_thing": False, "score": 0.7}]
    out = panoptic_overlay(np.zeros((2, 8, 3), np.uint8), ids, segments, alpha=1.0)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 255).all()  # void unpainted, a border after it
    assert (out[0, 2] != out[0, 4]).any() and (out[0, 2] != 0).any()
    np.testing.assert_array_equal(out[0, 6], voc_palette()[3 * 7:3 * 8])
    with pytest.raises(ValueError, match=r"segment ids \[3\]"):
        panoptic_overlay(np.zeros((2, 8, 3), np.uint8), ids, segments[:2])
