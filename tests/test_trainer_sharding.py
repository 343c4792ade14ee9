"""One EoMT training step through the Trainer on 8 fake CPU devices equals the 1-device step.

Data-parallel, FSDP and data x tensor-parallel meshes: the parameter change of one SGD step (i.e. the
gradient) agrees with one device to 1e-4 relative. (This test found XLA's SPMD partitioner summing the
weight gradient of a feature-grouped convolution 4x over the tensor axis; EoMT's depthwise convolution is
now written as shifted products.)"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxseg.testing.limits import hang_guard

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_steps_equal_one_device():
    proc = subprocess.run([sys.executable, str(HERE / "trainer_sharding_check.py")],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=HERE, capture_output=True, text=True,
                          timeout=hang_guard(900))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(results)
    assert max(results.values()) <= 1e-4, results
