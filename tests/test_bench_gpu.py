"""The one-command GPU benchmark (benchmarks/bench_gpu.py) in its dry-run form: tiny sizes on the CPU, run
as the GPU machine would run it, where grain, tfds and ml_collections are not installed (here: shadowed by
packages that fail to import), so a dependency on them creeps in only by failing this test."""
import os
import pathlib
import subprocess
import sys

import pytest

from jaxseg.testing.limits import hang_guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISSING_ON_GPU_MACHINE = ("grain", "tensorflow_datasets", "ml_collections")


@pytest.mark.slow
def test_dry_run_writes_the_whole_table_without_grain_tfds_or_ml_collections(tmp_path):
    for name in MISSING_ON_GPU_MACHINE:
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    out = tmp_path / "table.md"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "absent"), JAX_PLATFORMS="cpu")
    # The budget only stops a hung part; a part it stopped would fail the assertions below.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--out", str(out),
                           "--budget", str(hang_guard(600))], capture_output=True, text=True, env=env,
                          timeout=hang_guard(700))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| implementation")]
    (eomt_jax, eomt_torch, eomt_compiled, weaktr_jax, weaktr_torch) = rows
    for row, name in ((eomt_jax, "jaxseg"), (eomt_torch, "transformers eager")):
        assert row[0] == name and all(float(c) > 0 for c in row[1:4]), row  # img/s: batch 1, batch 2, train
    assert eomt_compiled[1] == "skipped in a dry run"
    assert weaktr_jax[0] == "jaxseg" and float(weaktr_jax[1]) > 0
    assert weaktr_torch[0] == "PyTorch reference (eager)" and float(weaktr_torch[1]) > 0
