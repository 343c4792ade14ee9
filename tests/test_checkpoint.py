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
    deadline = time.time() + 60
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
