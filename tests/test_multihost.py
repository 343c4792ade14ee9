"""Multi-process training on one machine: two CPU processes of 4 devices each, joined through
`jaxseg.parallel.initialize` (gloo collectives), run the real `Trainer` on a small MLP with the
ViT's logical parameter axes (`multihost_check.py`), under data parallelism (`dp`), FSDP within each
process (`fsdp`: data 2 x fsdp 4) and FSDP across both (`fsdp8`: every split parameter is half on each
process). Against one process on 8 devices fed the same global batches:

  * both processes log the same losses and end with bit-identical parameters;
  * the losses agree to 1e-5 relative and the parameter change of the 4 steps to 1e-5 relative to its
    largest entry per array (measured on every mesh: losses at most 3.8e-7, parameter changes 2.7e-6,
    which is one float32 rounding of an entry of fc1/kernel; the cross-process sums go another way);
  * the step-2 checkpoint holds the grain iterator state of each process, and resuming from it
    reproduces steps 3-4 of the straight run exactly.
  * the trainer's evaluation with the parameters split across both processes: each process predicts its
    own share of the images (3 and 2 of 5), and the merged metrics are the same on both and equal one
    process's: an untrained EoMT's PQ and mIoU (fixed-shape global batches) and a WeakTr's CAM sweep
    (each host on its own devices).

The tiny EoMT of `trainer_sharding_check.py` also trains equal across 2 processes (losses 1e-7
relative, parameters 1.2e-7 absolute), but compiling it takes ~110 s per run on 2 cores, so it is left
to `multihost_check.py --tasks eomt`.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxseg.data.pipeline import train_dataset
from jaxseg.testing.limits import hang_guard

HERE = pathlib.Path(__file__).resolve().parent
CHECK = HERE / "multihost_check.py"
MESHES = ("dp", "fsdp", "fsdp8")
STEPS, CHECKPOINT_AT, NUM_PROCESSES = 4, 2, 2
TOLERANCE = 1e-5
# Seconds: guards against a hang (a process waiting forever for a collective), not a speed limit: about
# 10x what the two processes and the reference take on 2 cores with a cold compilation cache (~80 s,
# ~40 s), so that a loaded machine never fails the test by being slow.
WORKERS_TIMEOUT, REFERENCE_TIMEOUT = hang_guard(900), hang_guard(600)

# Variables by which a process could find a cluster or coordinator to join (jax/_src/clusters).
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAXSEG_",
                     "JAX_COORDINATOR")


def _env(**extra):
    """The test's environment without a cluster to join, nor inherited XLA flags (the device counts here
    are the scripts' own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES) and k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(commands: list[list[str]], logs: pathlib.Path, timeout: float) -> None:
    """Runs the commands side by side; the first failure (or the timeout) kills the rest and fails
    with every process's stderr tail."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i, command in enumerate(commands):
        files.append(open(logs / f"stderr_{i}.txt", "w+"))
        procs.append(subprocess.Popen(command, cwd=HERE, env=_env(), stdout=files[-1],
                                      stderr=subprocess.STDOUT))
    deadline, failure = time.monotonic() + timeout, None
    try:
        while failure is None and None in [p.poll() for p in procs]:  # a list: every process polled
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout} s"
            time.sleep(0.2)
        failure = failure or next((f"process {i} exited with {p.returncode}"
                                   for i, p in enumerate(procs) if p.returncode), None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for i, f in enumerate(files):
        f.seek(0)
        lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
        f.close()
        tails.append(f"--- process {i} (rc {procs[i].returncode}) ---\n" + "\n".join(lines[-40:]))
    assert failure is None, failure + "\n" + "\n".join(tails)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("multihost")
    common = [sys.executable, str(CHECK), "--out", str(out), "--num-processes", str(NUM_PROCESSES),
              "--meshes", ",".join(MESHES), "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_AT),
              "--eval-meshes", "fsdp8"]
    coordinator = f"127.0.0.1:{_free_port()}"
    _run_together([common + ["--coordinator", coordinator, "--process-id", str(i)]
                   for i in range(NUM_PROCESSES)], out / "logs_workers", WORKERS_TIMEOUT)
    _run_together([common], out / "logs_reference", REFERENCE_TIMEOUT)
    return out


def _result(runs, mesh, name):
    return json.loads((runs / f"mlp_{mesh}" / f"{name}.json").read_text())


def _params(runs, mesh, name):
    with np.load(runs / f"mlp_{mesh}" / f"{name}.npz") as f:
        return dict(f)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_processes_agree(runs, mesh):
    first, second = (_result(runs, mesh, f"process_{i}") for i in range(NUM_PROCESSES))
    assert len(first["losses"]) == STEPS
    assert first["losses"] == second["losses"]
    a, b = (_params(runs, mesh, f"process_{i}") for i in range(NUM_PROCESSES))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_like_one(runs, mesh):
    losses = np.array(_result(runs, mesh, "process_0")["losses"])
    reference = np.array(_result(runs, mesh, "reference")["losses"])
    loss_difference = np.max(np.abs(losses - reference) / np.abs(reference))
    params, expected, initial = (_params(runs, mesh, n) for n in ("process_0", "reference", "initial"))
    assert sorted(params) == sorted(expected)
    # Relative to each array's largest change over the run (the parameters themselves are dominated by
    # their initialisation and would hide a wrong gradient).
    param_difference = max(np.max(np.abs(params[n] - expected[n])) / np.max(np.abs(expected[n] - initial[n]))
                           for n in expected)
    print(f"{mesh}: losses {loss_difference:.2g}, parameter changes {param_difference:.2g} relative")
    assert loss_difference <= TOLERANCE and param_difference <= TOLERANCE, (loss_difference, param_difference)


@pytest.mark.slow
def test_fsdp_splits_parameters_as_the_mesh_says(runs):
    """`embed`-axis arrays: whole on every device under dp, in 4 pieces on each process under fsdp
    (data 2 x fsdp 4), half on each process under fsdp8."""
    expected = {"dp": (1.0, 1), "fsdp": (1.0, 4), "fsdp8": (0.5, 4)}
    for mesh, (fraction, shards) in expected.items():
        for i in range(NUM_PROCESSES):
            layout = _result(runs, mesh, f"process_{i}")["layout"]
            for name in ("stem/kernel", "fc1/kernel", "fc2/kernel", "head/kernel"):
                held = layout[name]
                assert (held["local_fraction"], held["local_shards"]) == (fraction, shards), \
                    (mesh, i, name, held)


@pytest.mark.slow
def test_evaluation_with_params_split_across_processes_equals_one_process(runs):
    """The trainer's evaluation with every parameter half on each process (fsdp8): an untrained EoMT
    (panoptic + semantic over 5 scenes in global batches of 2 per process) and WeakTr (CAM mIoU at 18
    thresholds). Each process predicts its own images; both end with the same results, equal to one
    process's (PQ, its segment counts and mIoU to 1e-6; the CAM sweep identical)."""
    first, second, reference = (json.loads((runs / "eval_fsdp8" / f"{name}.json").read_text())
                                for name in ("process_0", "process_1", "reference"))
    assert first["results"] == second["results"]
    for name in ("eomt", "cam"):
        shares = first["predicted"][name], second["predicted"][name]
        assert sorted(shares[0] + shares[1]) == list(range(5)) and len(shares[0]) == 3, shares
        assert reference["predicted"][name] == list(range(5))
    eomt, cam = first["results"]["eomt"], first["results"]["cam"]
    # An untrained model matches no segment (PQ 0), but its unmatched predicted and missed segments are
    # counted, and its mIoU is small but not 0: numbers, not constants.
    assert eomt["examples"] == 5 and eomt["FP"] > 0 and eomt["FN"] > 0 and eomt["mean_iou"] > 0, eomt
    assert len(set(cam["cam_miou_curve"])) > 5  # a curve, not a constant
    for key in ("PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "TP", "FP", "FN", "mean_iou", "pixel_accuracy"):
        np.testing.assert_allclose(eomt[key], reference["results"]["eomt"][key], rtol=1e-6, err_msg=key)
    assert cam == reference["results"]["cam"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_checkpoint_holds_each_process_data_state_and_resumes_exactly(runs, mesh):
    data = runs / f"mlp_{mesh}" / "run" / "checkpoints" / str(CHECKPOINT_AT) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        f"process_{i}-of-{NUM_PROCESSES}.json" for i in range(NUM_PROCESSES)]
    for i in range(NUM_PROCESSES):
        result = _result(runs, mesh, f"process_{i}")
        assert result["resumed_losses"] == result["losses"][CHECKPOINT_AT:]
        straight, resumed = _params(runs, mesh, f"process_{i}"), _params(runs, mesh, f"process_{i}_resumed")
        for name in straight:
            np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, env=_env(**env), capture_output=True,
                          text=True, timeout=hang_guard(60))


def test_initialize_without_coordinator_or_cluster_is_a_single_process():
    proc = _python(
        "from jaxseg import parallel\n"
        "parallel.initialize()\n"
        "parallel.initialize()\n"
        "import jax\n"
        "print(jax.process_count(), jax.distributed.is_initialized(), jax.device_count())")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "False", "1"]


def test_initialize_reads_the_coordinator_from_the_environment():
    proc = _python(
        "from jaxseg import parallel\n"
        "parallel.initialize()\n"
        "parallel.initialize()\n"
        "import jax\n"
        "print(jax.process_count(), jax.distributed.is_initialized())",
        JAXSEG_COORDINATOR=f"127.0.0.1:{_free_port()}", JAXSEG_NUM_PROCESSES="1", JAXSEG_PROCESS_ID="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "True"]


def test_initialize_after_jax_started_raises():
    proc = _python(
        "import jax\n"
        "jax.devices()\n"
        "from jaxseg import parallel\n"
        "parallel.initialize()")
    message = ("RuntimeError: jaxseg.parallel.initialize() must be called before any other JAX "
               "operation")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]


SOURCE = [{"id": np.int32(i)} for i in range(20)]


def _batches(process_index, process_count, batch_size, n=5):
    draw = lambda example, rng: dict(example, draw=np.float32(rng.random()))
    iterator = iter(train_dataset(SOURCE, draw, seed=3, batch_size=batch_size, process_index=process_index,
                                  process_count=process_count))
    return [next(iterator) for _ in range(n)]


def test_process_batches_are_the_single_process_batch_in_another_row_order():
    """Per-process batches of B, put together process 0 first (as `make_array_from_process_local_data`
    does), hold the examples and augmentation draws of the one-process batch of 2B, but process i's rows
    are the one-process rows i, i + 2, ...: why `multihost_check.py`'s reference reads both pipelines."""
    one = _batches(0, 1, 8)
    per_process = [_batches(i, 2, 4) for i in range(2)]
    for k, batch in enumerate(one):
        for i in range(2):
            for key in batch:
                np.testing.assert_array_equal(per_process[i][k][key], batch[key][i::2])
