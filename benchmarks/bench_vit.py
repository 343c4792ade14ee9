"""Times the jaxseg ViT against timm's on the same weights and inputs, and prints a table.

    python benchmarks/bench_vit.py --variant S/16 --family deit --image-size 224 --batch 8

Forward (inference) and forward+backward (a training step's gradient) per batch, median of --steps
timed runs after warm-up/compilation. timm is optional (--no-torch skips it). On a GPU the JAX peak
memory is reported too.
"""
import argparse
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import install_torch_guard, median_seconds, print_table

from jaxseg.convert.timm import abstract_params, to_timm
from jaxseg.models.vit import ViT, vit_config

TIMM_NAMES = {("Ti", "deit"): "deit_tiny_patch16_224", ("S", "deit"): "deit_small_patch16_224",
              ("B", "deit"): "deit_base_patch16_224",
              ("L", "deit"): "vit_large_patch16_224", ("S", "dinov2_reg"): "vit_small_patch14_reg4_dinov2",
              ("B", "dinov2_reg"): "vit_base_patch14_reg4_dinov2",
              ("L", "dinov2_reg"): "vit_large_patch14_reg4_dinov2",
              ("g", "dinov2_reg"): "vit_giant_patch14_reg4_dinov2"}




def bench_jax(config, images, steps):
    model = ViT(**config)
    params = jax.jit(lambda: model.init(jax.random.key(0), images[:1]))()["params"]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(model.apply({"params": p}, x)[0] ** 2)))
    x = jnp.asarray(images)
    results = {"forward": median_seconds(lambda: forward(params, x).block_until_ready(), steps),
               "forward+backward": median_seconds(
                   lambda: jax.block_until_ready(grad(params, x)), steps)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        results["peak GiB"] = stats["peak_bytes_in_use"] / 2**30
    return results


def bench_timm(config, timm_name, images, steps):
    import torch

    install_torch_guard()
    import timm

    size = images.shape[1:3]
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=size,
                              patch_size=config["patch_size"]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def forward():
        with torch.no_grad():
            model.forward_features(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model.forward_features(x).pow(2).mean().backward()

    return {"forward": median_seconds(forward, steps),
            "forward+backward": median_seconds(forward_backward, steps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--family", default="deit", choices=["deit", "dinov2_reg"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="skip the timm reference")
    args = parser.parse_args(argv)

    patch = int(args.variant.split("/")[1])
    grid = args.image_size // patch
    config = vit_config(args.variant, args.family, posemb_grid=(grid, grid), dtype=args.dtype,
                        remat=args.remat)
    images = np.random.default_rng(0).standard_normal(
        (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    count = sum(int(np.prod(v.shape)) for v in jax.eval_shape(
        lambda p: to_timm(p, config), abstract_params(config)).values())

    rows = [("jaxseg", bench_jax(config, images, args.steps))]
    if not args.no_torch:
        rows.append(("timm", bench_timm(config, TIMM_NAMES[(args.variant.split("/")[0], args.family)],
                                         images, args.steps)))
    device = jax.devices()[0]
    print_table(f"# ViT-{args.variant} ({args.family}, {count / 1e6:.1f}M params), batch {args.batch}, "
                f"{args.image_size}px, {args.dtype}; JAX on {device.platform} ({device.device_kind}), "
                f"{platform.processor() or platform.machine()}, jax {jax.__version__}",
                args.batch, rows, ("forward", "forward+backward"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
