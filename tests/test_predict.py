"""Prediction files (`jaxseg.visualize`, tools/predict.py), standalone evaluation (tools/eval.py) and the
overlays `train_and_evaluate` writes, on tiny runs of the three methods trained for a few steps (the
numbers are those of nearly untrained models: the tests check plumbing and file formats). Expected
predictions come from the per-image reference forms of each scheme (`jaxseg.testing.per_image`,
`jaxseg.wsss.cam`), so the batched canvases of the evaluator are checked too."""
import importlib
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxseg.config import apply_overrides, load_config
from jaxseg.inference.mask_classification import panoptic_segments, semantic_scores
from jaxseg.models.weaktr import select_cam
from jaxseg.ops.image import normalize
from jaxseg.runs import load_run
from jaxseg.testing import per_image
from jaxseg.testing.limits import hang_guard
from jaxseg.train.main import train_and_evaluate
from jaxseg.visualize import (
    PredictionWriter,
    label_png,
    legend_height,
    overlay,
    panoptic_overlay,
    panoptic_png,
    voc_palette,
)
from jaxseg.wsss.cam import image_cams, pseudo_label

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["data.num_train=16", "data.num_val=4", "data.image_size=32", "method.crop_size=32", "train.batch_size=4",
        "model.encoder.width=32", "model.encoder.mlp_dim=64", "model.encoder.num_heads=2",
        "model.encoder.depth=2", "train.num_overlays=2", "pretrained.config="]
RUNS = {
    "eomt": ("configs/eomt/scenes.py:runlocal",
             ["train.total_steps=6", "train.log_every=6", "optimizer.warmup=(1, 1)", "model.num_queries=8",
              "method.set_loss.num_points=64"]),
    "weaktr": ("configs/weaktr/scenes_cam.py:runlocal",
               ["train.total_steps=2", "train.log_every=2", "method.steps_per_epoch=1", "model.reduction=2"]),
    "segmenter": ("configs/segmenter/scenes.py:runlocal",
                  ["train.total_steps=2", "train.log_every=2", "optimizer.warmup_steps=1", "method.base_size=35",
                   "model.decoder_heads=2", "model.decoder_mlp_dim=64"]),
}


def _expected(run, image: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """One image's prediction by the per-image reference form of the run's predictor."""
    method, params = run.method, run.params
    settings = run.eval_config().predictor
    if settings["kind"] == "panoptic":
        def final_logits(images):
            out = method.network.apply({"params": params}, images)
            return out["class_logits"][-1], out["mask_logits"][-1]
        class_logits, mask_logits = per_image.padded_square_logits(
            final_logits, jnp.asarray(image, jnp.float32) / 255, method.crop_size)
        ids, categories = panoptic_segments(class_logits, mask_logits, method.is_thing)
        return {"semantic": np.asarray(jnp.argmax(semantic_scores(class_logits, mask_logits), axis=0)),
                "panoptic": np.asarray(ids), "categories": np.asarray(categories)}
    if settings["kind"] == "sliding":
        predictor = method.predictor(**settings)
        probs = per_image.multiscale_flip_probs(
            lambda windows: predictor._log_scores(params, windows), normalize(jnp.asarray(image, jnp.float32) / 255),
            settings["scales"], base_short_side=method.base_size, window=method.crop_size,
            stride=method.crop_size * 2 // 3)
        return {"semantic": np.asarray(jnp.argmax(probs, axis=0))}
    predictor = method.predictor(**dict(settings, labels="predicted"))
    present = labels if labels is not None else np.asarray(predictor._predicted_labels(params, jnp.asarray(image)))

    def cam_fn(views):
        out = method.network.apply({"params": params}, views)
        return select_cam(out, predictor.cam_kind), out["patch_attention"] if settings["refine"] else None
    cams = image_cams(cam_fn, image, present, predictor.patch, settings["scales"])
    return {"semantic": np.asarray(pseudo_label(cams, present, settings["threshold"])), "present": present}


def _tool(name: str):
    return importlib.import_module(f"jaxseg.cli.{name}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> run directory, each trained once (all on one shared scenes build)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}

    def get(name):
        if name not in runs:
            spec, overrides = RUNS[name]
            config = load_config(str(ROOT / spec))
            apply_overrides(config, TINY + overrides + [f"data.data_dir={root / 'data'}"])
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
def test_predict_writes_what_the_per_image_scheme_gives(trained, images, tmp_path, name):
    run = trained(name)
    out, predict = tmp_path / "out", _tool("predict")
    assert predict.main(["--workdir", str(run), "--images", str(images), "--out_dir", str(out)]) == 0
    loaded = load_run(run)
    for stem in ("rgb", "gray", "rgba"):
        image = predict.read_image(next(images.glob(f"{stem}.*")))
        assert image.shape == (40, 32, 3) and image.dtype == np.uint8
        expected = _expected(loaded, image)
        semantic = Image.open(out / f"{stem}_semantic.png")
        assert semantic.mode == "P"
        np.testing.assert_array_equal(np.asarray(semantic), expected["semantic"])
        # Enlarged 8 times to a 256 px short side, the legend of the present classes below.
        present = set(np.unique(expected["semantic"]).tolist()) - {255}
        assert Image.open(out / f"{stem}_overlay.png").size == (256, 320 + legend_height(len(present), 256))
        if name == "eomt":  # the scenes EoMT is panoptic
            panoptic = _decode_panoptic(Image.open(out / f"{stem}_panoptic.png"))
            np.testing.assert_array_equal(panoptic, expected["panoptic"])
            segments = json.loads((out / f"{stem}_segments.json").read_text())
            assert sorted(s["id"] for s in segments) == sorted(set(np.unique(panoptic)) - {0})
            assert all(expected["categories"][s["id"]] == s["category_id"] for s in segments)
            legend = legend_height(len({s["category_id"] for s in segments}), 256)
            assert Image.open(out / f"{stem}_panoptic_overlay.png").size == (256, 320 + legend)
        cams = {int(p.stem.rsplit("_", 1)[1]) for p in out.glob(f"{stem}_cam_*.png")}
        if name == "weaktr":  # no labels: the classes the model predicts present
            assert cams == set(np.flatnonzero(expected["present"]))
        else:
            assert not cams


@pytest.mark.parametrize("name", list(RUNS))
def test_train_and_evaluate_writes_overlays_of_the_eval_split(trained, name):
    run = trained(name)
    loaded = load_run(run)
    overlays = run / "overlays" / f"step_{loaded.config.train.total_steps}"
    source = loaded.source("validation")
    for index in range(2):
        example = source[index]
        image_id = int(example["image_id"])
        labels = np.asarray(example["labels"][:loaded.method.num_classes], np.float32) if name == "weaktr" else None
        expected = _expected(loaded, np.asarray(example["image"]), labels)
        np.testing.assert_array_equal(np.asarray(Image.open(overlays / f"{image_id}_semantic.png")),
                                      expected["semantic"])
        if name == "weaktr":  # the dataset's image-level labels choose the CAMs
            cams = {int(p.stem.rsplit("_", 1)[1]) for p in overlays.glob(f"{image_id}_cam_*.png")}
            assert cams == set(np.flatnonzero(example["labels"][:loaded.method.num_classes]))
    assert len({p.name.split("_")[0] for p in overlays.iterdir()}) == 2  # num_overlays


def test_predict_refuses_to_overwrite_and_names_bad_images(trained, images, tmp_path, capsys):
    run, predict = trained("segmenter"), _tool("predict")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert predict.main(["--workdir", str(run), "--images", str(images), "--out_dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert predict.main(["--workdir", str(run), "--images", str(bad), "--out_dir", str(tmp_path / "b")]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err

    assert predict.main(["--workdir", str(run), "--dataset_split", "validation", "--limit", "1",
                         "--out_dir", str(tmp_path / "split")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["1000000000_overlay.png",
                                                                       "1000000000_semantic.png"]
    writer = PredictionWriter(tmp_path / "split")
    example = {"image": np.zeros((32, 32, 3), np.uint8), "image_id": 1000000000}
    with pytest.raises(FileExistsError, match="1000000000_semantic.png"):  # nor does the library
        writer(0, example, {"semantic": np.zeros((32, 32), np.int32)})


def test_eval_tool_reports_what_the_evaluator_gives(trained):
    run = trained("segmenter")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval.py"), "--workdir", str(run)],
                          capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((run / "eval_val_validation_step2.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {k: v for k, v in written.items()
                                                                 if k != "per_class_iou"}
    logged = json.loads((run / "eval_val_validation_metrics.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 2 and logged["mean_iou"] == written["mean_iou"]
    # The same numbers as the end of training (the same evaluation of the same step).
    trained_results = json.loads((run / "eval.json").read_text())["val"]
    assert written == dict(trained_results, step=2, split="validation", eval="val")

    evaluate_run = _tool("eval").evaluate_run
    with pytest.raises(ValueError, match="eval_val_validation_step2.json"):
        evaluate_run(run)
    with pytest.raises(ValueError, match="the model is the checkpoint's"):
        evaluate_run(run, overrides=["model.num_classes=3"], overwrite=True)


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
