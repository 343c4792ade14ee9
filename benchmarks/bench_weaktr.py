"""Memory and speed of WeakTr's training steps, jaxseg against the PyTorch references of the official code.

    python benchmarks/bench_weaktr.py --stage all --image-sizes 224 --batch 2 --steps 3

--stage picks stage 1 (the default), 2 or both.

jaxseg's side is the shipped train step (`jaxseg.train.step.make_train_step` over `WeakTrMethod` / `SegmenterMethod`, as
training runs it). Stage 1 (the CAM network: the three soft-margin losses, AdamW with weight decay 0.03 on
timm's per-epoch cosine, drop-path 0.1 as in WeakTr's recipe), for each of --image-sizes:
  - memory: tokens T = C + P, the bytes that keeping all K x H attention maps would take (what a direct
    port of the PyTorch code stores: K * H * T^2 floats per image), the temporary memory XLA allocates for
    the compiled step (`memory_analysis`, available on CPU too), and the step time (median). The same step
    of the MCTformer mode (same backbone and first two losses, no fusion module and no fine-CAM loss)
    gives the baseline: the difference is what the AAF fusion costs.
  - speed: the WeakTr step against `TorchWeakTr` (`jaxseg/testing/references/weaktr.py`) at the same size.
Stage 2 (the Segmenter: DeiT encoder with drop-path 0.1 and its final norm, a 2-block mask-transformer
decoder with dropout 0.1, the gradient-clipping cross-entropy of the last read-out in cells of
--clip-cell px, SGD with Nesterov momentum and the encoder at 0.1x) at --seg-image-size, against the
timm ViT + `TorchMultiMaskTransformer` + `GradientClipping` of `jaxseg/testing/references/segmenter.py`. The
clipping gate opens above --start-value: its default keeps the clipping branch running on random
weights (their CE is about ln(C + 1), above the recipe's 1.2, where the official code skips the branch).

Times are medians of --steps runs after a warm-up (and compilation) run. Peak memory is reported where
the backend keeps statistics (GPU: JAX's is this process's peak so far); PyTorch runs on CUDA when
available. --no-torch skips the references.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import install_torch_guard, median_seconds, print_table, time_train_step, torch_device

from jaxseg.data.datasets import DataConfig
from jaxseg.methods.segmenter import SegmenterMethod, SegmenterOptimizer
from jaxseg.methods.weaktr import WeakTrMethod, WeakTrOptimizer
from jaxseg.models.vit import vit_config

LR_STAGE1, LR_STAGE2, WEIGHT_DECAY, DROP_PATH = 7.5e-5, 1e-4, 0.03, 0.1


def time_torch_step(modules, optimizer, loss_fn, steps) -> dict:
    """{"train step": median seconds, "peak GiB"?} of `loss_fn()` + backward + `optimizer.step()`."""
    _, synchronize, peak, reset_peak = torch_device()
    modules.train()
    reset_peak()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        synchronize()

    result = {"train step": median_seconds(step, steps)}
    if peak() is not None:
        result["peak GiB"] = peak()
    return result


def _torch_inputs(images, targets, device):
    import torch

    return (torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device),
            torch.from_numpy(np.array(targets)).to(device))


def stage1_torch(encoder, classes, images, labels, steps) -> dict:
    import torch

    from jaxseg.testing.references.weaktr import TorchWeakTr, torch_cam_loss

    device = torch_device()[0]
    model = TorchWeakTr(classes, encoder["width"], encoder["depth"], encoder["num_heads"],
                        encoder["patch_size"], encoder["posemb_grid"][0],
                        mlp_ratio=encoder["mlp_dim"] // encoder["width"], drop_path_rate=DROP_PATH).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR_STAGE1, weight_decay=WEIGHT_DECAY)
    x, y = _torch_inputs(images, labels, device)
    return time_torch_step(model, optimizer, lambda: torch_cam_loss(model(x), y), steps)


def stage2_torch(encoder, classes, images, labels, cell, start_value, steps) -> dict:
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from jaxseg.testing.references.segmenter import (
        TorchMultiMaskTransformer,
        torch_gradient_clipping_loss,
        torch_segmenter,
    )

    device = torch_device()[0]
    width = encoder["width"]
    vit = VisionTransformer(img_size=images.shape[1], patch_size=encoder["patch_size"], embed_dim=width,
                            depth=encoder["depth"], num_heads=encoder["num_heads"],
                            mlp_ratio=encoder["mlp_dim"] // width, qkv_bias=True, num_classes=0,
                            drop_path_rate=DROP_PATH)
    decoder = TorchMultiMaskTransformer(classes, width, width // 64, dropout=0.1)
    modules = torch.nn.ModuleList([vit, decoder]).to(device)
    optimizer = torch.optim.SGD([{"params": vit.parameters(), "lr": 0.1 * LR_STAGE2},
                                 {"params": decoder.parameters(), "lr": LR_STAGE2}],
                                momentum=0.9, nesterov=True)
    x, y = _torch_inputs(images, labels, device)
    return time_torch_step(modules, optimizer, lambda: torch_gradient_clipping_loss(
        torch_segmenter(vit, decoder, x)[-1], y.long(), start_value, cell), steps)


def _devices(args) -> str:
    device = jax.devices()[0]
    text = f"JAX on {device.platform} ({device.device_kind}), jax {jax.__version__}"
    if not args.no_torch:
        import torch

        text += f"; PyTorch {torch.__version__} on {torch_device()[0]} ({torch.get_num_threads()} threads)"
    return text


def stage1(args) -> None:
    encoder = vit_config(args.variant, "deit", num_cls_tokens=args.classes, final_norm=False,
                         posemb_resize="dino", drop_path_rate=DROP_PATH, **args.encoder_overrides)
    labels = jnp.asarray(np.random.default_rng(0).random((args.batch, args.classes)) < 0.2, jnp.float32)
    rows = []
    for size in args.image_sizes:
        images = jnp.asarray(np.random.default_rng(1).random((args.batch, size, size, 3), np.float32))
        steps = {}
        for fusion in ("aaf", "mctformer"):
            method = WeakTrMethod(model=dict(encoder=encoder, num_classes=args.classes, fusion=fusion),
                                  optimizer=WeakTrOptimizer(lr=LR_STAGE1, weight_decay=WEIGHT_DECAY),
                                  total_steps=1000, batch_size=args.batch, data=DataConfig(name="jaxseg_scenes"),
                                  steps_per_epoch=100, crop_size=size)
            steps[fusion] = time_train_step(method, {"image": images, "labels": labels}, args.steps)
        reference = None if args.no_torch else stage1_torch(encoder, args.classes, images, labels, args.steps)
        rows.append((size, steps, reference))

    title = (f"WeakTr {args.variant} (depth {encoder['depth']}, {args.classes} classes), batch {args.batch}, "
             f"float32, drop-path {DROP_PATH}")
    print(f"# Stage-1 step memory: {title}; {_devices(args)}")
    print("| image | tokens T | all K x H maps MiB | WeakTr step temp MiB | MCTformer step temp MiB | "
          "WeakTr step ms | MCTformer step ms | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size, steps, _ in rows:
        (weaktr_temp, weaktr), (mct_temp, mct) = steps["aaf"], steps["mctformer"]
        tokens = args.classes + (size // encoder["patch_size"]) ** 2
        all_maps = encoder["depth"] * encoder["num_heads"] * tokens ** 2 * 4 * args.batch / 2**20
        peak = f"{weaktr['peak GiB'] * 1024:.0f}" if "peak GiB" in weaktr else "-"
        print(f"| {size} | {tokens} | {all_maps:.0f} | {weaktr_temp:.0f} | {mct_temp:.0f} | "
              f"{weaktr['train step'] * 1e3:.0f} | {mct['train step'] * 1e3:.0f} | {peak} |")
    for size, steps, reference in rows:
        if reference is not None:
            print()
            print_table(f"# Stage-1 train step (AdamW), {title}, {size}px; jaxseg vs the PyTorch reference",
                        args.batch, [("jaxseg", steps["aaf"][1]), ("PyTorch", reference)], ("train step",))


def stage2(args) -> None:
    size, patch = args.seg_image_size, int(args.variant.split("/")[1])
    encoder = vit_config(args.variant, "deit", posemb_grid=(size // patch, size // patch),
                         drop_path_rate=DROP_PATH, **args.encoder_overrides)
    classes = args.classes + 1  # background
    # Trained on pseudo-labels (the clipping loss asks for them; none are read here).
    method = SegmenterMethod(model=dict(encoder=encoder, num_classes=classes, decoder_heads=encoder["width"] // 64,
                                        decoder_mlp_dim=4 * encoder["width"]),
                             optimizer=SegmenterOptimizer(lr=LR_STAGE2), total_steps=1000, batch_size=args.batch,
                             data=DataConfig(name="jaxseg_scenes", pseudo_labels_dir="unused"), crop_size=size,
                             clip_cell_size=args.clip_cell, start_value=args.start_value)
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.standard_normal((args.batch, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, classes, (args.batch, size, size)), jnp.int32)

    temp, result = time_train_step(method, {"image": images, "semantic": labels}, args.steps)
    rows = [("jaxseg", result)]
    if not args.no_torch:
        rows.append(("PyTorch", stage2_torch(encoder, classes, images, labels, args.clip_cell, args.start_value,
                                             args.steps)))
    print()
    print_table(f"# Stage-2 train step (gradient clipping, SGD), Segmenter {args.variant} "
                f"(depth {encoder['depth']}, {classes} classes), {size}px, batch {args.batch}, float32; "
                f"{_devices(args)}",
                args.batch, rows, ("train step",))
    print(f"jaxseg compiled step: {temp:.0f} MiB of XLA temporary buffers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--stage", choices=["1", "2", "all"], default="1")
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--classes", type=int, default=20, help="foreground classes C")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 320], help="stage 1")
    parser.add_argument("--seg-image-size", type=int, default=480, help="stage 2 (crop size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--depth", type=int, help="override the encoder depth (small CPU runs)")
    parser.add_argument("--clip-cell", type=int, default=120, help="gradient-clipping cell size (px)")
    parser.add_argument("--start-value", type=float, default=10.0, help="gradient-clipping gate")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
    parser.add_argument("--torch-threads", type=int,
                        help="PyTorch CPU threads (default: PyTorch's; on a loaded machine its spinning "
                             "OpenMP threads can slow it down by an order of magnitude)")
    args = parser.parse_args(argv)
    if args.stage != "1" and not args.no_torch and args.seg_image_size % args.clip_cell:
        parser.error(f"--clip-cell {args.clip_cell} must divide --seg-image-size {args.seg_image_size}: the "
                     f"official clipping code pads by H mod cell and fails otherwise")
    args.encoder_overrides = {"depth": args.depth} if args.depth else {}
    if not args.no_torch:
        install_torch_guard()
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()[0]
    if args.stage in ("1", "all"):
        stage1(args)
    if args.stage in ("2", "all"):
        stage2(args)
    # On a shared CPU other processes' load decides much of the timing (PyTorch's most of all).
    print(f"1-minute load average: {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"{os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
