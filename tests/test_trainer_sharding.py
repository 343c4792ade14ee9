"""One EoMT training step through the Trainer on 8 fake CPU devices equals the 1-device step.

Data-parallel and FSDP meshes: the parameter change of one SGD step (i.e. the gradient) agrees with one
device to 1e-4 relative (measured 4.9e-6). The data x tensor-parallel mesh is not asserted: its step
differed substantially from the 1-device step on EoMT (while the ViT alone agrees, see test_sharding.py);
this is an open item (suspected: Hungarian assignments flipping on near-tied costs under a different
reduction order, not yet confirmed)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_dp_and_fsdp_steps_equal_one_device():
    proc = subprocess.run([sys.executable, str(HERE / "trainer_sharding_check.py")],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=HERE, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(results)
    assert results["dp"] <= 1e-4 and results["fsdp"] <= 1e-4
