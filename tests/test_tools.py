"""The benchmark scripts run end to end (tiny settings, JAX side only) and print their tables."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,expected", [
    ("benchmark_vit.py", ["--variant", "Ti/16", "--image-size", "32", "--batch", "1", "--steps", "1"],
     "| jaxseg |"),
    ("benchmark_eomt.py", ["--size", "S", "--depth", "1", "--image-size", "32", "--batch", "1",
                           "--queries", "4", "--targets", "2", "--points", "16", "--steps", "1"],
     "of the train step"),
])
def test_benchmark_scripts_run(script, args, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args, "--no-torch"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout


def test_weaktr_benchmark_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_weaktr.py"), "--variant", "Ti/16",
                           "--depth", "3", "--classes", "3", "--image-sizes", "32", "--batch", "1",
                           "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 32 | 7 |" in proc.stdout
