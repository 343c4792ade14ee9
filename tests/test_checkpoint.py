"""orbax checkpoints: state + data iterator + config, keep-N, preemption safety, params-only restore."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.convert import WeightConversionError
from jaxseg.testing.limits import hang_guard
from jaxseg.train.checkpoint import Checkpointer, restore_params

STATE = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}, "opt": {"mu": jnp.zeros(3)},
         "step": jnp.array(5, jnp.int32)}


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _iterator():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_round_trip_keeps_the_last_n_and_the_data_position(tmp_path):
    iterator = _iterator()
    next(iterator), next(iterator)
    checkpointer = Checkpointer(tmp_path, max_to_keep=2)
    for step in (5, 7, 9):
        checkpointer.save(step, STATE, iterator, {"step": step, "model": "tiny"})
    checkpointer.close()
    assert sorted(int(p.name) for p in checkpointer.directory.iterdir() if p.name.isdigit()) == [7, 9]
    resumed = _iterator()
    state, config = Checkpointer(tmp_path).restore(_abstract(STATE), resumed)
    assert config == {"step": 9, "model": "tiny"}
    np.testing.assert_array_equal(next(resumed), np.arange(8, 12))
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(STATE)):
        np.testing.assert_array_equal(a, b)


def test_restore_into_another_model_names_the_problem(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, STATE)
    checkpointer.close()
    with pytest.raises(WeightConversionError, match=r"\+ unexpected  w \(2, 3\)"):
        restore_params(tmp_path, {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                                  "b": jax.ShapeDtypeStruct((3,), jnp.float32)})
    params = restore_params(tmp_path, _abstract(STATE["params"]))
    np.testing.assert_array_equal(params["w"], STATE["params"]["w"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(_abstract(STATE))


def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        Checkpointer(tmp_path / "run")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tmp_path):
    """SIGKILL while a large step is being written: the previous step stays the latest complete one and
    the run can resume and save again."""
    script = textwrap.dedent(f"""
        import jax.numpy as jnp, sys, time
        from jaxseg.train.checkpoint import Checkpointer
        c = Checkpointer({str(tmp_path)!r}, async_save=False)
        c.save(1, {{"params": {{"w": jnp.ones(4)}}}})
        print("saved", flush=True)
        c.save(2, {{"params": {{"w": jnp.ones((8000, 8000))}}}})  # 256 MB: killed while writing
        print("finished", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + hang_guard(60)
    while time.time() < deadline and not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir()):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 1
    state, _ = checkpointer.restore({"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}})
    np.testing.assert_array_equal(state["params"]["w"], np.ones(4))
    checkpointer.save(2, {"params": {"w": jnp.full(4, 2.0)}})
    checkpointer.close()
    assert Checkpointer(tmp_path).latest_step() == 2


def _truncate_array_files(step_dir):
    """orbax (OCDBT) keeps the array bytes in data files under `d/` folders: each loses its second half."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _empty_state_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("")


def _remove_state_item(step_dir):
    import shutil

    shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("damage, reasons", [
    # OCDBT keeps some metadata in the data files too: a cut file may already fail the metadata read.
    (_truncate_array_files, ("restoring it failed", "its metadata cannot be read")),
    (_empty_state_metadata, ("its metadata cannot be read",)),
    (_remove_state_item, ("item(s) ['state'] are missing",)),
])
def test_a_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage, reasons):
    """Restores (the trainer's and the params-only one) skip a damaged newest step with a warning that names
    it and why, restore the one before, and delete nothing; training moves the damaged step aside."""
    checkpointer = Checkpointer(tmp_path, async_save=False)
    iterator = _iterator()
    for step in (1, 2):
        next(iterator)
        checkpointer.save(step, jax.tree_util.tree_map(lambda x, scale=step: x * scale, STATE), iterator)
    checkpointer.close()
    damage(tmp_path / "checkpoints" / "2")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    params, step = restore_params(tmp_path, _abstract(STATE["params"]), with_step=True)
    assert step == 1
    np.testing.assert_array_equal(params["w"], STATE["params"]["w"])
    resumed = _iterator()
    restoring = Checkpointer(tmp_path)
    state, _ = restoring.restore(_abstract(STATE), resumed)
    assert restoring.restored_step == 1 and int(state["step"]) == 5
    np.testing.assert_array_equal(next(resumed), np.arange(4, 8))  # the data position of step 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "jaxseg" in r.name]
    assert len(warnings) == 2, warnings
    assert all(any(f"skipping checkpoint step 2 in {tmp_path / 'checkpoints'}: {reason}" in w for reason in reasons)
               for w in warnings), warnings
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing deleted

    restoring.restore(_abstract(STATE), _iterator(), set_aside_damaged=True)
    assert (tmp_path / "unusable_checkpoints" / "2").is_dir() and restoring.latest_step() == 1
    restoring.save(2, STATE)  # the step can be saved again
    restoring.close()
    assert Checkpointer(tmp_path).latest_step() == 2


def test_restore_gives_up_with_one_error_when_no_step_is_usable(tmp_path):
    checkpointer = Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, STATE)
    checkpointer.close()
    _empty_state_metadata(tmp_path / "checkpoints" / "1")
    _remove_state_item(tmp_path / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*step 2: item\(s\) \['state'\] are missing; "
                                         r"step 1: its metadata cannot be read.*nothing was changed"):
        Checkpointer(tmp_path).restore(_abstract(STATE))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
