"""Bad input, as a new user gives it, to every tool and to the Python API: each is one `error:` line (long
messages continue on indented lines), exit code 2, no traceback, and the run directory byte-identical
before and after. The tools run in-process (`main(argv)`), on one tiny EoMT run trained once."""
import hashlib
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxseg import parallel
from jaxseg.cli import convert_weights, make_dataset, predict, pseudo_labels, train
from jaxseg.cli import eval as eval_tool
from jaxseg.config import RuleError, apply_overrides, construct, load_config
from jaxseg.errors import UserError
from jaxseg.models.eomt import EoMT
from jaxseg.runs import load_run
from jaxseg.train.main import train_and_evaluate
from jaxseg.train.trainer import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "eomt" / "scenes.py") + ":runlocal"
TINY = ["data.num_train=16", "data.num_val=4", "data.image_size=32", "method.crop_size=32", "train.batch_size=4",
        "model.encoder.width=32", "model.encoder.mlp_dim=64", "model.encoder.num_heads=2",
        "model.encoder.depth=2", "model.num_queries=8", "method.set_loss.num_points=64",
        "optimizer.warmup=(1, 1)", "train.log_every=3", "train.checkpoint_every=3", "train.num_overlays=0",
        "pretrained.config="]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """The tools join a multi-process run first thing; this test process already runs JAX as one process."""
    monkeypatch.setattr(parallel, "_initialized", True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """A tiny EoMT run with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = load_config(CONFIG)
    apply_overrides(config, TINY + ["train.total_steps=6", f"data.data_dir={root / 'data'}"])
    train_and_evaluate(config, root / "run")
    return root / "run"


def snapshot(directory: pathlib.Path) -> dict:
    """{relative path: content hash, or "dir"} of everything under `directory`."""
    return {str(p.relative_to(directory)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))}


def assert_one_error(capsys, code: int, *fragments: str) -> str:
    """Exit code 2, one line starting with `error:` (continuations indented), no traceback; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    after = lines[lines.index(errors[0]) + 1:]
    assert all(line.startswith("  ") for line in after), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def _train(run_dir, *overrides):
    return train.main(["--config", CONFIG, "--workdir", str(run_dir)]
                      + [a for o in TINY + ["train.total_steps=9", *overrides] for a in ("--set", o)])


@pytest.mark.parametrize("overrides, fragments", [
    (["train.total_steps=abc"], ["--set train.total_steps: 'abc' is not a int"]),
    (["train.total_step=5"], ["unknown config key 'train.total_step'", "total_steps"]),
    (["optimizer.lr=-0.001"], ["config key optimizer.lr=-0.001", "finite and >= 0"]),
    (["optimizer.lr=1e400"], ["optimizer.lr=inf", "finite and >= 0"]),
    (["optimizer.weight_decay=-1.0"], ["optimizer.weight_decay=-1.0", "finite and >= 0"]),
    (["data.hue_spread=1.5"], ["config key data.hue_spread=1.5", "must be in [0, 1]"]),
    (["method.set_loss.num_points=0"], ["config key method.set_loss.num_points=0", ">= 1"]),
    (["method.crop_size=36"], ["method.crop_size=36", "divisible by the model's patch size 8"]),
    (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    (["evals.val.batch_size=0"], ["evals.val.batch_size=0", ">= 1"]),
    (["model.encoder.width=48"], ["does not match the model", "a run resumes the model it started with"]),
    (["optimizer.freeze_encoder=True"], ["does not fit this run's", "optimizer.freeze_encoder",
                                         "missing     opt_state/"]),
    (["train.total_steps"], ["must look like key=value"]),
])
def test_train_refuses_a_bad_rerun_and_leaves_the_run_as_it_was(run, capsys, overrides, fragments):
    before = snapshot(run)
    assert_one_error(capsys, _train(run, *overrides), *fragments)
    assert snapshot(run) == before


def test_train_refuses_bad_places_and_configs(run, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_error(capsys, _train(a_file), "is not a directory")
    assert_one_error(capsys, _train("/proc/jaxseg-run"), "/proc/jaxseg-run")  # the OS refuses (even root)
    assert not (tmp_path / "new").exists()
    assert_one_error(capsys, _train(tmp_path / "new", "data.data_dir=/proc/jaxseg-data"), "/proc/jaxseg-data")
    assert_one_error(capsys, train.main(["--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "w")]),
                     "no config file")
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert_one_error(capsys, train.main(["--config", str(tmp_path / "empty.py"), "--workdir", str(tmp_path / "w")]),
                     "defines no get_config")
    assert_one_error(capsys, train.main(["--config", CONFIG.replace("runlocal", "bogus"), "--print_config"]),
                     "unknown config argument 'bogus'")
    assert_one_error(capsys, train.main(["--config", CONFIG, "--workdir", str(tmp_path / "w"), "--bogus"]),
                     "unrecognized arguments: --bogus")
    # A short run whose warm-up would never reach the peak rate.
    segmenter = str(ROOT / "configs" / "segmenter" / "scenes.py") + ":runlocal"
    assert_one_error(capsys, train.main(["--config", segmenter, "--workdir", str(tmp_path / "w"), "--set",
                                         "train.total_steps=50"]), "must exceed optimizer.warmup_steps 100")
    assert not (tmp_path / "w").exists()


def test_eval_refuses_what_is_not_a_usable_run(run, tmp_path, capsys):
    before = snapshot(run)
    assert_one_error(capsys, eval_tool.main(["--workdir", str(tmp_path)]), "holds no config.json")
    assert_one_error(capsys, eval_tool.main(["--workdir", str(run), "--eval", "nope"]),
                     "no evaluation 'nope'", "['val']")
    assert_one_error(capsys, eval_tool.main(["--workdir", str(run), "--step", "999"]),
                     "no checkpoint of step 999", "[3, 6]")
    assert_one_error(capsys, eval_tool.main(["--workdir", str(run), "--set", "model.num_queries=4"]),
                     "the model is the checkpoint's")
    assert_one_error(capsys, eval_tool.main(["--workdir", str(run), "--step", "abc"]), "invalid int value: 'abc'")
    (run / "eval_val_validation_step6.json").write_text("{}")
    try:
        taken = snapshot(run)
        assert_one_error(capsys, eval_tool.main(["--workdir", str(run)]), "exists; pass --overwrite")
        assert snapshot(run) == taken
    finally:
        (run / "eval_val_validation_step6.json").unlink()
    assert snapshot(run) == before
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "config.json").write_text('{"method": ')
    assert_one_error(capsys, eval_tool.main(["--workdir", str(damaged)]), "config.json is not valid JSON")


def test_predict_checks_every_input_before_writing_anything(run, tmp_path, capsys):
    before = snapshot(run)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    common = ["--workdir", str(run), "--out_dir", str(out)]
    assert_one_error(capsys, predict.main(common + ["--images", str(images)]), "cannot read image", "broken.png")
    assert not out.exists()
    assert_one_error(capsys, predict.main(common + ["--images", str(tmp_path / "nowhere")]),
                     "no image file or directory")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_error(capsys, predict.main(common + ["--images", str(tmp_path / "notes.txt")]),
                     "is not a .png/.jpg/.jpeg image")
    assert_one_error(capsys, predict.main(common + ["--images", str(images / "good.png"), "--limit", "0"]),
                     "--limit must be at least 1")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_error(capsys, predict.main(common + ["--images", str(images / "good.png")]),
                     "is not empty; pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert_one_error(capsys, predict.main(["--workdir", str(tmp_path), "--images", str(images / "good.png"),
                                           "--out_dir", str(tmp_path / "out2")]), "holds no config.json")
    assert snapshot(run) == before


def test_pseudo_labels_refuse_other_runs_and_bad_files(run, tmp_path, capsys):
    common = ["--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]
    assert_one_error(capsys, pseudo_labels.main(["--checkpoint", str(run), *common]),
                     "is a run of method 'eomt', not a WeakTr CAM run")
    (tmp_path / "model.json").write_text("{not json")
    assert_one_error(capsys, pseudo_labels.main(["--checkpoint", str(tmp_path), "--model_config",
                                                 str(tmp_path / "model.json"), *common]), "is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_unreadable_and_non_finite_weights(tmp_path, capsys):
    from safetensors.numpy import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    out = ["--output", str(tmp_path / "out.msgpack")]
    assert_one_error(capsys, convert_weights.main(["--input", str(corrupt), *out]), "cannot read", "corrupt")
    weights = {"cls_token": np.zeros((1, 1, 8), np.float32), "pos_embed": np.full((1, 5, 8), np.nan, np.float32)}
    save_file(weights, str(tmp_path / "nan.safetensors"))
    assert_one_error(capsys, convert_weights.main(["--input", str(tmp_path / "nan.safetensors"), *out]),
                     "NaN or Inf values", "pos_embed")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    assert_one_error(capsys, convert_weights.main(["--input", str(tmp_path / "weights.ckpt"), *out]),
                     "unsupported weights file")
    assert_one_error(capsys, convert_weights.main(["--input", str(tmp_path / "none.pth"), *out]),
                     "no weights file")
    assert not (tmp_path / "out.msgpack").exists()


def test_make_dataset_refuses_bad_values(tmp_path, capsys):
    assert_one_error(capsys, make_dataset.main(["images", "--out_dir", str(tmp_path / "i"), "--count", "0"]),
                     "--count must be at least 1")
    assert_one_error(capsys, make_dataset.main(["scenes", "--data_dir", str(tmp_path), "--image_size", "8"]),
                     "image_size")
    assert_one_error(capsys, make_dataset.main(["scenes", "--data_dir", str(tmp_path), "--num_train", "x"]),
                     "invalid int value: 'x'")
    assert not (tmp_path / "i").exists()


def test_the_python_api_refuses_with_the_same_messages(run, tmp_path):
    with pytest.raises(RuleError, match=r"config key train.batch_size=0 breaks the rule: must be >= 1"):
        construct(TrainConfig, {"total_steps": 5, "batch_size": 0}, where="train")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_run(tmp_path)
    model = EoMT(encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4)),
                 num_classes=3, num_queries=4, num_query_blocks=1)
    images = jnp.full((1, 32, 32, 3), 200.0)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images / 255))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    with pytest.raises(UserError, match=r"images hold values in \[200, 200\]; this model takes RGB in \[0, 1\]"):
        model.apply(params, images)
    model.apply(params, images / 255)  # in range: fine
    jax.jit(model.apply)(params, images)  # traced: cannot be looked at, documented
