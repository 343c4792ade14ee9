"""Memory and time of a WeakTr stage-1 training step (forward + backward of the CAM loss).

    python tools/benchmark_weaktr.py --image-sizes 224 320 448 --batch 2

For each input size: tokens T = C + P, the bytes that keeping all K x H attention maps would take
(what a direct port of the PyTorch code stores: K * H * T^2 floats per image), the temporary memory
XLA allocates for the compiled step (`memory_analysis`, available on CPU too), the peak device memory
where the backend reports it, and the step time (median). The same step of the MCTformer mode (same
backbone and first two losses, no fusion module and no fine-CAM loss) gives the baseline: the difference
is what the AAF fusion costs.
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_common import median_seconds
from jaxseg.losses.multilabel import cam_loss
from jaxseg.models.vit import vit_config
from jaxseg.models.weaktr import WeakTr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--depth", type=int, help="override the depth (small CPU runs)")
    args = parser.parse_args(argv)

    overrides = dict(num_cls_tokens=args.classes, final_norm=False, posemb_resize="dino")
    if args.depth:
        overrides["depth"] = args.depth
    encoder = vit_config(args.variant, "deit", **overrides)
    size0 = encoder["posemb_grid"][0] * encoder["patch_size"]
    tx = optax.adamw(4e-4)
    labels = jnp.asarray(np.random.default_rng(0).random((args.batch, args.classes)) < 0.2, jnp.float32)

    def measure(fusion, images):
        model = WeakTr(encoder=encoder, num_classes=args.classes, fusion=fusion)
        params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, size0, size0, 3))))()["params"]
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, opt_state, images):
            loss, grads = jax.value_and_grad(
                lambda p: cam_loss(model.apply({"params": p}, images), labels)[0])(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        temp = train_step.lower(params, opt_state, images).compile().memory_analysis().temp_size_in_bytes
        seconds = median_seconds(lambda: jax.block_until_ready(train_step(params, opt_state, images)),
                                 args.steps)
        return temp / 2**20, seconds

    device = jax.devices()[0]
    print(f"# WeakTr {args.variant} (depth {encoder['depth']}, {args.classes} classes), batch {args.batch}, "
          f"float32; JAX on {device.platform} ({device.device_kind}), jax {jax.__version__}")
    print("| image | tokens T | all K x H maps MiB | WeakTr step temp MiB | MCTformer step temp MiB | "
          "WeakTr step ms | MCTformer step ms | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.image_sizes:
        images = jnp.asarray(np.random.default_rng(1).random((args.batch, size, size, 3), np.float32))
        weaktr_temp, weaktr_time = measure("aaf", images)
        mct_temp, mct_time = measure("mctformer", images)
        tokens = args.classes + (size // encoder["patch_size"]) ** 2
        all_maps = encoder["depth"] * encoder["num_heads"] * tokens ** 2 * 4 * args.batch / 2**20
        stats = device.memory_stats() or {}
        peak = f"{stats['peak_bytes_in_use'] / 2**20:.0f}" if "peak_bytes_in_use" in stats else "-"
        print(f"| {size} | {tokens} | {all_maps:.0f} | {weaktr_temp:.0f} | {mct_temp:.0f} | "
              f"{weaktr_time * 1e3:.0f} | {mct_time * 1e3:.0f} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
