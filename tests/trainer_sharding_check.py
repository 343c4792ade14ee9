"""Run as a subprocess with 8 fake CPU devices: one EoMT SGD step through the Trainer under
data-parallel, FSDP and data x tensor-parallel meshes against the same step on one device. Prints one
JSON line: the largest relative difference of the parameter change (the gradient) per mesh."""
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxseg.data.datasets import DataConfig  # noqa: E402
from jaxseg.data.synthetic import SceneConfig, generate_scene  # noqa: E402
from jaxseg.losses.mask_classification import SetLossConfig  # noqa: E402
from jaxseg.methods.eomt import Annealing, EomtMethod, EomtOptimizer  # noqa: E402
from jaxseg.parallel import MeshConfig  # noqa: E402
from jaxseg.train.trainer import TrainConfig, Trainer  # noqa: E402

MODEL = dict(encoder=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                          num_registers=4, posemb_covers_prefix=False),
             num_classes=9, num_queries=8, num_query_blocks=1)
MESHES = {"dp": (("data", 8), ("fsdp", 1), ("tensor", 1)),
          "fsdp": (("data", 1), ("fsdp", 8), ("tensor", 1)),
          "dp_tp": (("data", 2), ("fsdp", 1), ("tensor", 4))}


class SgdEomtMethod(EomtMethod):
    """EoMT with plain SGD: Adam's normalised first step would turn round-off in near-zero gradients
    into full-size steps, hiding what is compared here (the sharded loss and gradients)."""

    def optimizer_for(self, params):
        return optax.sgd(0.1)


def source():
    scenes = [generate_scene(SceneConfig(image_size=32), i) for i in range(16)]
    return [dict(s, semantic=s["semantic"][..., None]) for s in scenes]


def run(mesh, steps):
    method = SgdEomtMethod(model=MODEL, optimizer=EomtOptimizer(), total_steps=30, batch_size=8,
                           data=DataConfig(name="jaxseg_scenes"), crop_size=32, scale_range=(0.9, 1.1),
                           set_loss=SetLossConfig(num_points=256),
                           # Masking fully annealed: thresholding logits at 0 would turn round-off from a
                           # different reduction order (tensor parallelism) into different attention masks.
                           annealing=Annealing((-2,), (-1,)))
    config = TrainConfig(total_steps=steps, batch_size=8, log_every=1, checkpoint_every=100)
    devices = jax.devices()[:1] if mesh is None else jax.devices()
    mesh = MeshConfig((("data", 1), ("fsdp", 1), ("tensor", 1)) if mesh is None else mesh).make_mesh(devices)
    params = jax.device_get(Trainer(method, config, tempfile.mkdtemp(), source(), mesh=mesh).run().params)
    return jax.tree_util.tree_leaves(params)


def main():
    assert jax.device_count() == 8
    initial = run(None, 0)
    reference = [after - before for after, before in zip(run(None, 1), initial)]
    scale = max(np.abs(u).max() for u in reference)
    results = {}
    for name, mesh in MESHES.items():
        # One SGD step: the parameter change is -lr * gradient, so this compares the sharded gradients;
        # leaves whose true gradient is ~0 are measured against 1e-3 of the largest change.
        updates = [after - before for after, before in zip(run(mesh, 1), initial)]
        results[name] = max(float(np.abs(u - r).max() / max(np.abs(r).max(), 1e-3 * scale))
                            for u, r in zip(updates, reference))
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
