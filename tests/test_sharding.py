"""The ViT on an 8-device CPU mesh (data-parallel, FSDP, data x tensor-parallel) equals one device.

Forward outputs and attention maps agree to 1e-5 relative. Gradients agree to 1e-4: the query/key
kernel gradients pass through the softmax backward, where large terms cancel, and float32 round-off
alone puts even the single-device gradients ~2.4e-5 away from a float64 computation (measured with
`jax_enable_x64` on this model); the sharded ones are ~3.3e-5 away, i.e. also round-off.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxseg.testing.limits import hang_guard

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "sharding_check.py")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=hang_guard(600))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Per-device shapes of the query kernel (width 64, 4 heads, 16 dims), the first MLP kernel (64 x 256)
# and the output tokens (batch 8, 21 tokens, 64).
@pytest.mark.parametrize("strategy,query_shard,fc1_shard,tokens_shard", [
    ("dp", [64, 4, 16], [64, 256], [1, 21, 64]),
    ("fsdp", [8, 4, 16], [8, 256], [1, 21, 64]),
    ("dp_tp", [64, 1, 16], [64, 64], [4, 21, 64]),
])
def test_sharded_equals_single_device(results, strategy, query_shard, fc1_shard, tokens_shard):
    r = results[strategy]
    print(strategy, r)
    assert r["same_init"], "sharded init must give the same parameters as unsharded init"
    assert r["query_kernel_shard"] == query_shard
    assert r["fc1_kernel_shard"] == fc1_shard
    assert r["tokens_shard"] == tokens_shard
    assert r["tokens_err"] <= 1e-5
    assert r["probs_err"] <= 1e-5
    assert r["loss_err"] <= 1e-5
    assert r["grads_err"] <= 1e-4
