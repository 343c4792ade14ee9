"""The benchmark scripts (benchmarks/) run end to end (tiny settings, JAX side only) and print their tables."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from jaxseg.testing.limits import hang_guard

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,expected", [
    ("bench_vit.py", ["--variant", "Ti/16", "--image-size", "32", "--batch", "1", "--steps", "1"],
     "| jaxseg |"),
    ("bench_eomt.py", ["--size", "S", "--depth", "1", "--image-size", "32", "--batch", "1",
                           "--queries", "4", "--targets", "2", "--points", "16", "--steps", "1"],
     "of the train step"),
])
def test_benchmark_scripts_run(script, args, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-torch"],
                          capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout


def test_weaktr_benchmark_runs_both_stages():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_weaktr.py"), "--stage", "all",
                           "--variant", "Ti/16", "--depth", "3", "--classes", "3", "--image-sizes", "32",
                           "--seg-image-size", "32", "--clip-cell", "16", "--batch", "1", "--steps", "1"],
                          capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 32 | 7 |" in proc.stdout
    assert "# Stage-2 train step" in proc.stdout
    assert proc.stdout.count("| jaxseg |") == 2 and proc.stdout.count("| PyTorch |") == 2


def test_crf_benchmark_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_crf.py"), "--sizes", "32", "--images", "2",
                           "--batch", "2", "--crf", "voc", "--no-pydensecrf"],
                          capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 32 | voc | - |" in proc.stdout


NUM_THINGS = 6  # the default scenes have 6 thing classes; stuff is background


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(data_dir, dataset name) of a tiny scenes build (3 train images of 32 px), prepared once."""
    from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config

    data_dir = tmp_path_factory.mktemp("data")
    config = scenes_config(image_size=32, num_train=3, num_val=1)
    JaxsegScenes(config=config, data_dir=data_dir, num_workers=1).download_and_prepare(
        file_format="array_record")
    return data_dir, f"jaxseg_scenes/{config.name}"


def _tiny_weaktr():
    """(WeakTr keyword arguments as JSON holds them, random params) of a tiny WeakTr for the scenes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxseg.models.weaktr import WeakTr

    model_config = {"encoder": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                                    posemb_grid=[4, 4], num_cls_tokens=NUM_THINGS, final_norm=False,
                                    posemb_resize="dino"),
                    "num_classes": NUM_THINGS, "reduction": 2}
    model = WeakTr(**dict(model_config, encoder=dict(model_config["encoder"], posemb_grid=(4, 4))))
    return model_config, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]


def _check_pseudo_labels(out_dir: pathlib.Path) -> None:
    import json

    from PIL import Image

    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).mode == "P" and Image.open(pngs[0]).size == (32, 32)
    report = json.loads((out_dir / "report.json").read_text())
    assert report["thresholds"] == [0.3, 0.5] and len(report["cam_miou_curve"]) == 2


def test_make_pseudo_labels_end_to_end(scenes, tmp_path):
    """A (random) WeakTr checkpoint + a tiny scenes build -> palette PNGs and a threshold-sweep report."""
    import json

    from jaxseg.train.checkpoint import Checkpointer

    model_config, params = _tiny_weaktr()
    (tmp_path / "model.json").write_text(json.dumps(model_config))
    checkpointer = Checkpointer(tmp_path / "run")
    checkpointer.save(10, {"params": params})
    checkpointer.close()
    data_dir, dataset = scenes
    command = [sys.executable, str(ROOT / "tools" / "make_pseudo_labels.py"), "--checkpoint",
               str(tmp_path / "run"), "--model_config", str(tmp_path / "model.json"), "--data_dir",
               str(data_dir), "--dataset", dataset, "--out_dir", str(tmp_path / "out"), "--num_foreground",
               str(NUM_THINGS), "--sweep", "0.3", "0.5", "--cam_kind", "cross", "--par"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_pseudo_labels(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["cam_kind"] == "cross" and report["par"] is True
    again = subprocess.run(command, capture_output=True, text=True, timeout=hang_guard(300), cwd=ROOT)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites silently


def test_make_pseudo_labels_from_a_converted_params_file(scenes, tmp_path, capsys):
    """A WeakTr params file (as convert_weights.py writes from an official checkpoint) is a checkpoint of its
    own: the model comes from the file. A plain ViT file (e.g. a DeiT init) is refused by name."""
    from jaxseg.cli import pseudo_labels as tool
    from jaxseg.convert.params_io import save_params

    model_config, params = _tiny_weaktr()
    save_params(tmp_path / "weaktr.msgpack", model_config, params)
    save_params(tmp_path / "vit.msgpack", model_config["encoder"], params["encoder"])
    data_dir, dataset = scenes
    common = ["--data_dir", str(data_dir), "--dataset", dataset, "--sweep", "0.3", "0.5"]
    assert tool.main(["--checkpoint", str(tmp_path / "weaktr.msgpack"), "--out_dir", str(tmp_path / "out"),
                      *common]) == 0
    _check_pseudo_labels(tmp_path / "out")
    assert tool.main(["--checkpoint", str(tmp_path / "vit.msgpack"), "--out_dir", str(tmp_path / "vit_out"),
                      *common]) == 2
    error = capsys.readouterr().err
    assert "vit.msgpack holds plain ViT params" in error and "not a WeakTr network" in error


def _crf_pseudo_labels(scenes, tmp_path, name: str, *options: str) -> dict:
    """The report of the pseudo-label tool run in-process with --crf voc and `options` into tmp_path/name."""
    import json

    from jaxseg.cli import pseudo_labels as tool
    from jaxseg.convert.params_io import save_params

    if not (tmp_path / "weaktr.msgpack").exists():
        save_params(tmp_path / "weaktr.msgpack", *_tiny_weaktr())
    data_dir, dataset = scenes
    assert tool.main(["--checkpoint", str(tmp_path / "weaktr.msgpack"), "--data_dir", str(data_dir), "--dataset",
                      dataset, "--sweep", "0.3", "0.5", "--out_dir", str(tmp_path / name), "--crf", "voc",
                      *options]) == 0
    _check_pseudo_labels(tmp_path / name)
    return json.loads((tmp_path / name / "report.json").read_text())


def test_make_pseudo_labels_with_crf(scenes, tmp_path):
    """--crf voc refines the PNGs with the JAX dense CRF and reports the labels' mIoU before and after it."""
    report = _crf_pseudo_labels(scenes, tmp_path, "out")
    assert report["crf"] == "voc" and report["crf_backend"] == "jax"
    assert 0 <= report["labels_miou"] <= 1 and 0 <= report["crf_miou"] <= 1


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                    reason="optional extra jaxseg[crf] (pydensecrf) not installed")
def test_pydensecrf_backend_in_worker_processes_writes_the_jax_backends_labels(scenes, tmp_path):
    import numpy as np
    from PIL import Image

    ours = _crf_pseudo_labels(scenes, tmp_path, "jax")
    reference = _crf_pseudo_labels(scenes, tmp_path, "pydensecrf", "--crf_backend", "pydensecrf", "--crf_workers", "2")
    assert reference["crf_backend"] == "pydensecrf" and reference["crf_miou"] == ours["crf_miou"]
    for png in sorted((tmp_path / "jax").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "pydensecrf" / png.name)))


def test_train_tool_runs_the_scenes_config_and_resumes(tmp_path):
    """The README's main job, shortened: builds the scenes into the workdir, trains, evaluates, and a
    rerun resumes from the checkpoint instead of starting over."""
    import json

    command = [sys.executable, str(ROOT / "tools" / "train.py"), "--config",
               str(ROOT / "configs" / "eomt" / "scenes.py") + ":runlocal", "--workdir", str(tmp_path / "run"),
               "--set", "train.total_steps=8", "--set", "optimizer.warmup=(2, 2)", "--set", "train.log_every=4",
               "--set", "data.num_train=32", "--set", "data.num_val=4", "--set", "pretrained.config="]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=hang_guard(600), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["val"]
    assert 0.0 <= result["mean_iou"] <= 1.0 and result["examples"] == 4
    logged = (tmp_path / "run" / "train_metrics.jsonl").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=hang_guard(600), cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run" / "train_metrics.jsonl").read_text() == logged  # nothing retrained

    typo = subprocess.run(command[:6] + ["--set", "train.total_step=5"], capture_output=True, text=True, cwd=ROOT)
    assert typo.returncode == 2 and "unknown config key 'train.total_step'" in typo.stderr
    assert "'total_steps'" in typo.stderr  # the valid keys are listed
    (tmp_path / "file").write_text("x")
    bad_dir = subprocess.run(command[:4] + ["--workdir", str(tmp_path / "file")], capture_output=True,
                             text=True, cwd=ROOT)
    assert bad_dir.returncode == 2 and "is not a directory" in bad_dir.stderr
