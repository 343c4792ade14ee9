"""Run as a subprocess with 8 fake CPU devices (the device count is fixed at JAX's first use, so the
main test process cannot change it): the ViT under data-parallel, FSDP and data x tensor-parallel meshes
against the same ViT on one device. Prints one JSON line of results."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxseg import parallel as sharding  # noqa: E402
from jaxseg.models.vit import ViT  # noqa: E402

MESHES = {
    "dp": [("data", 8), ("fsdp", 1), ("tensor", 1)],
    "fsdp": [("data", 1), ("fsdp", 8), ("tensor", 1)],
    "dp_tp": [("data", 2), ("fsdp", 1), ("tensor", 4)],
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def grads_error(grads, ref_grads):
    """Largest relative error over parameters. The key-projection bias is left out: softmax is
    invariant to it, so its true gradient is zero and both sides hold only round-off."""
    flat = flax.traverse_util.flatten_dict(nn.unbox(grads), sep="/")
    ref = flax.traverse_util.flatten_dict(nn.unbox(ref_grads), sep="/")
    return max(rel_err(flat[k], ref[k]) for k in ref if not k.endswith("key/bias"))


def main():
    assert jax.device_count() == 8, jax.devices()
    model = ViT(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                num_registers=4, posemb_covers_prefix=False, layerscale_init=0.5)
    images = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
    init = lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 3)))

    def loss_and_outputs(variables, x):
        def loss(v):
            tokens, out = model.apply(v, x, return_attention=True)
            return jnp.mean(tokens ** 2), (tokens, out["attn_probs"])
        return jax.value_and_grad(loss, has_aux=True)(variables)

    ref_vars = jax.jit(init)(jax.random.key(0))
    (ref_loss, (ref_tokens, ref_probs)), ref_grads = jax.jit(loss_and_outputs)(ref_vars, images)

    # Float32 round-off of the batch reduction alone, for scale: the same single-device step on the
    # batch in reverse order (the loss is a mean, so the exact gradients are identical).
    _, reordered_grads = jax.jit(loss_and_outputs)(ref_vars, images[::-1])
    results = {"batch_reorder_grads_err": grads_error(reordered_grads, ref_grads)}
    for name, axes in MESHES.items():
        mesh = sharding.make_mesh(axes)
        abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = sharding.tree_shardings(abstract, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            # Parameters are created already sharded: the full model never exists on one device.
            variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
            x = jax.device_put(images, sharding.batch_sharding(mesh, ndim=4))
            step = jax.jit(loss_and_outputs, in_shardings=(shardings, x.sharding))
            (loss, (tokens, probs)), grads = step(variables, x)
        kernel = variables["params"]["blocks_0"]["attn"]["query"]["kernel"]
        fc1 = variables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
        same_init = all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(nn.unbox(variables)), jax.tree_util.tree_leaves(nn.unbox(ref_vars))))
        results[name] = {
            "mesh": sharding.describe(mesh),
            # Per-device shapes show what is actually split (size-1 mesh axes split nothing).
            "query_kernel_shard": kernel.value.sharding.shard_shape(kernel.value.shape),
            "fc1_kernel_shard": fc1.value.sharding.shard_shape(fc1.value.shape),
            "tokens_shard": tokens.sharding.shard_shape(tokens.shape),
            "same_init": same_init,
            "tokens_err": rel_err(tokens, ref_tokens),
            "probs_err": max(rel_err(p, r) for p, r in zip(probs, ref_probs)),
            "loss_err": rel_err(loss, ref_loss),
            "grads_err": grads_error(grads, ref_grads),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
