"""jaxseg: Vision-Transformer segmentation in JAX/Flax."""
import os

# jaxlib 0.10.2's experimental YNNPACK fusion on CPU gets a batched matmul over a broadcast operand followed
# by a reduction wrong (off by ~1e2; tests/test_xla_workarounds.py has the case). XLA reads its flags when
# the CPU backend starts, so switching the fusion off here covers every program run after importing jaxseg;
# a user who sets the flag themselves keeps their choice.
_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type"
if _YNN_FUSION not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FUSION}=".strip()
