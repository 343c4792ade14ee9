"""Test-session set-up: persistent compilation cache, and importable PyTorch references."""
import atexit
import os
import pathlib
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Compiled XLA programs are cached inside the workspace so that reruns (and the subprocess tests, which
# inherit the environment) skip most compilation. Must be set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Pretrained encoders a test builds (`jaxseg.train.pretrained`) never reach, nor come from, the user's cache.
os.environ["JAXSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxseg-test-cache-")
atexit.register(shutil.rmtree, os.environ["JAXSEG_CACHE_DIR"], ignore_errors=True)

from jaxseg.testing import torch_guard  # noqa: E402

torch_guard.install()
