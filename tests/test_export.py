"""Exported predictors (`jaxseg.export`, tools/export.py) served by `jaxseg.serving`: the outputs of the
library's predictor `predict` on the same images, for a fixed and a symbolic batch size, with the
parameters inline or in params.npz; the loader runs with jax and numpy only; bad inputs are one `error:`
line. One tiny EoMT run is trained once; the comparisons use its parameters plus fixed noise (a 6-step
model predicts one class everywhere, which would hide a wrong pixel) and thresholds that keep segments.
Segmenter's windows are checked on initial parameters, without a run. Measured: integer outputs equal,
float outputs within 5.1e-7 (the bound is 1e-6)."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import methods, serving
from jaxseg.cli import export as export_tool
from jaxseg.config import apply_overrides, load_config
from jaxseg.errors import UserError
from jaxseg.export import (
    PARAMS_FILE,
    export_predictor,
    export_run,
    predictor_settings,
    serving_function,
    sized_predictor,
)
from jaxseg.runs import load_run
from jaxseg.testing.limits import hang_guard
from jaxseg.train.main import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "eomt" / "scenes.py") + ":runlocal"
TINY = ["data.num_train=16", "data.num_val=4", "data.image_size=32", "method.crop_size=32", "train.batch_size=4",
        "model.encoder.width=32", "model.encoder.mlp_dim=64", "model.encoder.num_heads=2",
        "model.encoder.depth=2", "model.num_queries=8", "method.set_loss.num_points=64",
        "optimizer.warmup=(1, 1)", "train.total_steps=6", "train.log_every=6", "train.checkpoint_every=6",
        "train.num_overlays=0", "pretrained.config="]
# Low enough that the noisy model's queries become segments.
THRESHOLDS = ["evals.val.predictor.score_threshold=0.0", "evals.val.predictor.overlap_threshold=0.3",
              "evals.val.predictor.mask_threshold=0.3"]
SIZE = (32, 48)  # not square: the semantic predictor pads it to a 48x48 canvas, the export cuts it back
TALL = (48, 32)  # the semantic predictor transposes it on the host: the export's pixel placement does


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("export")
    config = load_config(CONFIG)
    apply_overrides(config, TINY + [f"data.data_dir={root / 'data'}"])
    # The encoder layout this 6-step model was tuned in: its queries then make segments of several classes.
    config.model.encoder.update(num_registers=4, posemb_covers_prefix=False)
    train_and_evaluate(config, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def run(run_dir):
    loaded = load_run(run_dir, overrides=THRESHOLDS)
    leaves, tree = jax.tree_util.tree_flatten(jax.device_get(loaded.params))
    rng = np.random.default_rng(0)
    return dataclasses.replace(loaded, params=tree.unflatten(
        [leaf + 0.3 * rng.standard_normal(leaf.shape).astype(leaf.dtype) for leaf in leaves]))


def images(size: tuple[int, int], count: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (count, *size, 3), np.uint8)


def library_outputs(run, kind: str, batch: np.ndarray) -> dict:
    """The run's predictor `predict` (jitted, as the evaluator runs it) on `batch`, maps cut to the
    image size as its `finish` does."""
    settings = {"panoptic": {k: v for k, v in run.eval_config().predictor.items() if k not in ("kind", "canvas")},
                "semantic": {}}[kind]
    height, width = batch.shape[1:3]
    predictor = run.method.predictor(kind, canvas=(height, width), **settings)
    prepared = [predictor.prepare({"image": image}) for image in batch]
    inputs = jax.tree_util.tree_map(lambda *rows: np.stack(rows), *prepared)
    outputs = jax.device_get(jax.jit(predictor.predict)(run.params, inputs))
    return {key: value[:, :height, :width] if value.ndim == 3 else value for key, value in outputs.items()}


def assert_same(served: dict, expected: dict) -> float:
    """Integer outputs equal, float outputs within 1e-6; returns the largest float difference."""
    assert sorted(served) == sorted(expected)
    worst = 0.0
    for key, value in expected.items():
        got = np.asarray(served[key])
        assert got.shape == value.shape and got.dtype == value.dtype, key
        if np.issubdtype(value.dtype, np.floating):
            worst = max(worst, float(np.abs(got - value).max()))
            np.testing.assert_allclose(got, value, rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got, value, err_msg=key)
    return worst


@pytest.mark.parametrize("kind", ["panoptic", "semantic"])
def test_exported_predictor_gives_the_library_predictors_outputs(run, tmp_path, kind):
    batch = images(SIZE)
    expected = library_outputs(run, kind, batch)
    if kind == "panoptic":  # the comparison must see segments and several classes
        assert len(np.unique(expected["panoptic"])) > 3 and len(np.unique(expected["semantic"])) > 3
    else:
        assert len(np.unique(expected["semantic"])) > 3

    fixed = export_run(run, SIZE, kind=kind, batch_size=2).save(tmp_path / "fixed")
    assert not (fixed / PARAMS_FILE).exists()
    served = serving.load(fixed)
    assert served.metadata["input"]["shape"] == [2, *SIZE, 3]
    assert_same(served(batch[:2]), {k: v[:2] for k, v in expected.items()})

    symbolic = export_run(run, SIZE, kind=kind, params_mode="npz").save(tmp_path / "symbolic")
    served = serving.load(symbolic)
    assert served.metadata["input"]["shape"] == ["b", *SIZE, 3] and served.metadata["params"] == PARAMS_FILE
    for count in (1, 3):
        assert_same(served(batch[:count]), {k: v[:count] for k, v in expected.items()})


def test_a_tall_input_is_placed_as_prepare_places_it(run, tmp_path):
    batch = images(TALL, 2)
    served = serving.load(export_run(run, TALL, kind="semantic").save(tmp_path / "tall"))
    assert_same(served(batch), library_outputs(run, "semantic", batch))


def test_segmenter_multiscale_flip_predictor_exports_too():
    """Segmenter's flipped multi-scale windows, on initial parameters (no run needed); broadcasting its
    resize matrices over the batch inside the program once gave wrong maps on XLA:CPU."""
    config = load_config(str(ROOT / "configs" / "segmenter" / "scenes.py") + ":runlocal")
    apply_overrides(config, ["method.crop_size=32", "method.base_size=35", "model.encoder.width=32",
                             "model.encoder.mlp_dim=64", "model.encoder.num_heads=2", "model.encoder.depth=2",
                             "model.decoder_heads=2", "model.decoder_mlp_dim=64"])
    method = methods.build(config)
    params = nn.unbox(jax.jit(method.init_params)(jax.random.PRNGKey(0)))
    size = (32, 40)
    predictor = method.predictor("sliding", canvas=size, scales=(1.0, 1.25), max_aspect=1.25)
    batch = images(size, 3)
    inputs = jax.tree_util.tree_map(lambda *rows: np.stack(rows), *[predictor.prepare({"image": i}) for i in batch])
    expected = {"semantic": np.asarray(jax.jit(predictor.predict)(params, inputs)["semantic"])}
    assert len(np.unique(expected["semantic"])) > 3
    exported = jax.export.deserialize(export_predictor(predictor, params, size).serialize())
    for count in (1, 3):
        assert_same(exported.call(batch[:count]), {"semantic": expected["semantic"][:count]})


def test_bfloat16_parameters_survive_params_npz(run, tmp_path):
    bf16 = dataclasses.replace(run, params=jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), run.params))
    batch = images(SIZE, 1)
    inline = serving.load(export_run(bf16, SIZE, kind="semantic", batch_size=1).save(tmp_path / "inline"))
    npz = serving.load(export_run(bf16, SIZE, kind="semantic", batch_size=1, params_mode="npz").save(tmp_path / "npz"))
    assert_same(npz(batch), jax.device_get(inline(batch)))


def test_serving_runs_with_jax_and_numpy_only(run, tmp_path):
    """The loader in a process where flax, optax, orbax, ml_collections and every jaxseg module but
    jaxseg.serving cannot be imported, on a symbolic-batch npz export."""
    directory = export_run(run, SIZE, kind="panoptic", params_mode="npz").save(tmp_path / "export")
    batch = images(SIZE, 2)
    np.save(tmp_path / "images.npy", batch)
    script = f"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "optax", "orbax", "ml_collections") or (
                name.startswith("jaxseg.") and name != "jaxseg.serving"):
            raise ImportError(f"{{name}} is blocked: serving must not need it")

sys.meta_path.insert(0, Blocked())
import numpy as np
from jaxseg import serving

outputs = serving.load({str(directory)!r})(np.load({str(tmp_path / "images.npy")!r}))
np.savez({str(tmp_path / "served.npz")!r}, **{{k: np.asarray(v) for k, v in outputs.items()}})
print(sorted(m for m in sys.modules if m.startswith(("jaxseg", "flax"))))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=hang_guard(120))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['jaxseg', 'jaxseg.serving']"
    with np.load(tmp_path / "served.npz") as served:
        assert_same(dict(served), library_outputs(run, "panoptic", batch))


def test_loader_refuses_images_the_program_does_not_take(run, tmp_path):
    served = serving.load(export_run(run, SIZE, kind="semantic", batch_size=2).save(tmp_path / "export"))
    wanted = "must be a uint8 array of shape (2, 32, 48, 3)"
    good = images(SIZE, 2)
    for bad, got in [(good.astype(np.float32), "got float32 (2, 32, 48, 3)"), (good[:1], "got uint8 (1, 32, 48, 3)"),
                     (good[:, :, :32], "got uint8 (2, 32, 32, 3)"), (good[0], "got uint8 (32, 48, 3)"),
                     (good.tolist(), "got a list")]:
        with pytest.raises(ValueError) as error:
            served(bad)
        assert wanted in str(error.value) and got in str(error.value)
    symbolic = serving.load(export_run(run, SIZE, kind="semantic").save(tmp_path / "symbolic"))
    with pytest.raises(ValueError, match=r"shape \(b, 32, 48, 3\).*got uint8 \(0, 32, 48, 3\)"):
        symbolic(good[:0])


def test_window_bounds_grow_only_where_an_input_needs_them(run):
    for size, windows in [((32, 48), 2), ((32, 160), 6)]:
        kind, settings, _ = predictor_settings(run, size, "semantic")
        predictor, settings = sized_predictor(run.method, kind, settings, size)
        assert settings["max_windows"] == predictor.max_windows == windows


def test_export_refuses_a_predictor_whose_inputs_depend_on_the_pixels():
    class Normalising:
        def prepare(self, example):
            return {"image": example["image"], "mean": np.asarray(example["image"]).mean()}

    with pytest.raises(UserError, match="depend on the pixels' values"):
        serving_function(Normalising(), (8, 8))


def assert_one_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_export_tool_writes_an_export_and_replaces_it_only_when_asked(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    common = ["--workdir", str(run_dir), "--out", str(out), "--size", "32", "48"]
    assert export_tool.main(common + ["--kind", "semantic", "--params", "npz", "--batch_size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "semantic" and summary["input"] == [2, 32, 48, 3] and summary["step"] == 6
    assert sorted(p.name for p in out.iterdir()) == sorted([serving.METADATA, serving.PROGRAM, PARAMS_FILE])
    metadata = json.loads((out / serving.METADATA).read_text())
    assert metadata["outputs"] == {"semantic": {"shape": [2, 32, 48], "dtype": "int32"}}
    assert metadata["class_names"][:3] == ["disc", "triangle", "star"] and metadata["method"] == "eomt"
    # No evaluation of the run uses it: its defaults, the canvas the input size.
    assert metadata["predictor"] == {"kind": "semantic", "settings": {"canvas": [32, 48], "max_windows": 2}}
    assert metadata["run"]["evaluation"] is None

    assert_one_error(capsys, export_tool.main(common), "is not empty; pass --overwrite")
    assert export_tool.main(common + ["--overwrite"]) == 0  # the run's panoptic evaluation, parameters inline
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted([serving.METADATA, serving.PROGRAM])
    served = serving.load(out)
    assert served.metadata["predictor"]["kind"] == "panoptic" and served.metadata["run"]["evaluation"] == "val"
    batch = images(SIZE, 2)
    assert_same(served(batch), library_outputs(load_run(run_dir), "panoptic", batch))


def test_export_tool_refuses_bad_inputs_and_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    common = ["--workdir", str(run_dir), "--out", str(out)]
    for argv, fragments in [
        (["--workdir", str(tmp_path / "none"), "--out", str(out), "--size", "32"], ["holds no config.json"]),
        (common + ["--size", "32", "--kind", "bogus"], ["EoMT predictor 'bogus' is not available",
                                                       "['instance', 'panoptic', 'semantic']"]),
        (common + ["--size", "32", "--eval", "test"], ["no evaluation 'test'", "['val']"]),
        (common + ["--size", "32", "--eval", "val", "--kind", "semantic"],
         ["evaluation 'val' uses the 'panoptic' predictor, not 'semantic'"]),
        (common + ["--size", "0"], ["input size must be", "got (0, 0)"]),
        (common + ["--size", "32", "48", "64"], ["--size takes one side or a height and a width"]),
        (common + ["--size", "32", "--batch_size", "0"], ["batch size must be at least 1"]),
        (common + ["--size", "32", "--platforms", "cpu,gpu"], ["platforms must be some of", "'gpu'"]),
        (common + ["--size", "32", "--params", "zip"], ["invalid choice: 'zip'"]),
        (common + ["--size", "32", "--set", "model.num_queries=4"], ["the model is the checkpoint's"]),
    ]:
        assert_one_error(capsys, export_tool.main(argv), *fragments)
        assert not out.exists()
    (tmp_path / "a_file").write_text("")
    assert_one_error(capsys, export_tool.main(["--workdir", str(run_dir), "--out", str(tmp_path / "a_file"),
                                               "--size", "32"]), "exists and is not a directory")
