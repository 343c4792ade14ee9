"""Times jaxseg's EoMT against transformers' EomtForUniversalSegmentation on the same weights and
inputs, and prints a table with ratios.

    python benchmarks/bench_eomt.py --size S --image-size 256 --batch 2 --queries 100 --targets 20

Rows: inference forward (masked attention off), and the shipped training step (`make_train_step` over
`EomtMethod`: masked attention on with all probabilities 1, set loss over the L2+1 predictions, backward,
the recipe's AdamW with LLRD and gradient clipping; transformers' side: AdamW). Median of --steps timed
runs after warm-up/compilation. Also: the share of the jaxseg step spent in matching (cost matrix +
Hungarian for every prediction layer), measured by timing that part alone; the FLOPs of both jaxseg
programs (XLA cost analysis), achieved TFLOP/s and, given --peak-tflops, MFU. On a GPU the JAX peak
memory is reported too, and PyTorch runs on CUDA (under bfloat16 autocast with --dtype bfloat16).
transformers is optional (--no-torch). A GPU run of the paper's setting:

    python benchmarks/bench_eomt.py --size L --image-size 640 --queries 200 --batch 16 --dtype bfloat16 \
        --targets 100 --peak-tflops 989
"""
import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_common import install_torch_guard, median_seconds, print_table, shipped_train_step

from jaxseg.data.datasets import DataConfig
from jaxseg.losses.mask_classification import SetLossConfig, Targets, draw_points, matching_cost
from jaxseg.matching import match
from jaxseg.methods.eomt import Annealing, EomtMethod, EomtOptimizer
from jaxseg.models.eomt import eomt_config
from jaxseg.parallel import DEFAULT_RULES


def _targets(batch, num_targets, size, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((batch, num_targets, size, size), np.float32)
    for b in range(batch):
        for g in range(num_targets):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 16, size / 4)]
            masks[b, g] = np.hypot(yy - cy, xx - cx) < r
    labels = rng.integers(0, num_classes, (batch, num_targets)).astype(np.int32)
    return Targets(masks, labels, np.ones((batch, num_targets), bool))


def _flops(jitted, *args) -> float | None:
    """FLOPs of one call, from XLA's cost analysis of the compiled program (None if unavailable)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return (analysis or {}).get("flops")


def bench_jax(config, images, targets, loss_config, steps):
    """The shipped train step (`jaxseg.train.step.make_train_step` over `EomtMethod`: annealed masking, the set loss on
    every prediction, the recipe's AdamW with LLRD and clipping), masking on in every block."""
    batch, num_targets = targets.labels.shape
    num_blocks = config["num_query_blocks"]
    never = (10 ** 6,) * num_blocks  # annealing windows beyond the benchmarked steps: masking probability 1
    method = EomtMethod(model=config, optimizer=EomtOptimizer(), total_steps=10 ** 6 + 1, batch_size=batch,
                        data=DataConfig(name="jaxseg_scenes"), crop_size=images.shape[1], max_segments=num_targets,
                        set_loss=loss_config, annealing=Annealing(never, tuple(n + 1 for n in never)))
    train_step, train_state, inputs = shipped_train_step(method, {
        "image": images, "masks": targets.masks, "labels": targets.labels, "valid": targets.valid})
    state = {"train": train_state}
    with jax.set_mesh(inputs["image"].sharding.mesh), nn.logical_axis_rules(DEFAULT_RULES):
        params = state["train"].params
        forward = jax.jit(lambda p, x: method.network.apply({"params": p}, x))
        out = forward(params, images)

        @jax.jit
        def matching_only(class_logits, mask_logits, key):
            results = []
            for layer_key in jax.random.split(key, num_blocks + 1):
                draws = draw_points(layer_key, batch, num_targets, loss_config)
                cost = matching_cost(class_logits, mask_logits, targets, draws.match_points, loss_config)
                results.append(match(cost, targets.valid, method=loss_config.matcher).query_of_target)
            return results

        def step():
            state["train"], metrics = train_step(state["train"], inputs)
            metrics["loss"].block_until_ready()

        results = {"flops": {"forward": _flops(forward, params, images),
                             "train step": _flops(train_step, state["train"], inputs)},
                   "forward": median_seconds(lambda: forward(params, images)["mask_logits"].block_until_ready(),
                                             steps),
                   "train step": median_seconds(step, steps),
                   "matching": median_seconds(lambda: jax.block_until_ready(matching_only(
                       out["class_logits"][0], out["mask_logits"][0], jax.random.key(0))), steps)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        results["peak GiB"] = stats["peak_bytes_in_use"] / 2**30
    return results


def bench_torch(config, images, targets, num_points, steps, dtype, *, compiled=False, train=True):
    """transformers' EoMT on the same sizes: {"forward": s, "train step": s (with `train`)}; `compiled`:
    the model under `torch.compile`."""
    import torch

    install_torch_guard()
    from transformers import EomtConfig, EomtForUniversalSegmentation

    enc = config["encoder"]
    hf_config = EomtConfig(
        hidden_size=enc["width"], num_hidden_layers=enc["depth"], num_attention_heads=enc["num_heads"],
        mlp_ratio=enc["mlp_dim"] // enc["width"], image_size=images.shape[1], patch_size=enc["patch_size"],
        num_register_tokens=enc["num_registers"], num_blocks=config["num_query_blocks"],
        num_queries=config["num_queries"], num_labels=config["num_classes"], train_num_points=num_points,
        use_swiglu_ffn=enc.get("mlp_type") == "swiglu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = EomtForUniversalSegmentation(hf_config).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    model = torch.compile(module) if compiled else module
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    mask_labels = [torch.from_numpy(m).to(device) for m in targets.masks]
    class_labels = [torch.from_numpy(c).long().to(device) for c in targets.labels]

    def autocast():  # the mixed-precision counterpart of jaxseg's bfloat16 compute
        return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def forward():
        module.eval()
        module.attn_mask_probs.fill_(0.0)
        with torch.no_grad(), autocast():
            model(pixel_values=x)
        synchronize()

    def train_step():
        module.train()
        module.attn_mask_probs.fill_(1.0)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model(pixel_values=x, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        optimizer.step()
        synchronize()

    result = {"forward": median_seconds(forward, steps)}
    if train:
        result["train step"] = median_seconds(train_step, steps)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="S", choices=["S", "B", "L", "g"])
    parser.add_argument("--depth", type=int, help="override the backbone depth (small CPU runs)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--points", type=int, default=12544)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense TFLOP/s at this dtype, to report MFU")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)

    overrides = {"dtype": args.dtype}
    if args.depth:
        overrides["depth"] = args.depth
    config = eomt_config(args.size, num_classes=args.classes, num_queries=args.queries,
                         image_size=args.image_size, **overrides)
    if args.depth:
        config["num_query_blocks"] = min(config["num_query_blocks"], args.depth)
    images = np.random.default_rng(0).random((args.batch, args.image_size, args.image_size, 3),
                                            dtype=np.float32)
    targets = _targets(args.batch, args.targets, args.image_size, args.classes)
    loss_config = SetLossConfig(num_points=args.points)
    rows = [("jaxseg", bench_jax(config, jnp.asarray(images), targets, loss_config, args.steps))]
    if not args.no_torch:
        rows.append(("transformers", bench_torch(config, images, targets, args.points, args.steps,
                                                 args.dtype)))

    device = jax.devices()[0]
    enc = config["encoder"]
    print_table(f"# EoMT-{args.size} (depth {enc['depth']}, L2 {config['num_query_blocks']}, "
                f"Q {args.queries}), {args.image_size}px, batch {args.batch}, {args.targets} targets, "
                f"{args.points} points, {args.dtype}; JAX on {device.platform} ({device.device_kind}), "
                f"jax {jax.__version__}", args.batch, rows, ("forward", "train step"))
    timings = rows[0][1]
    for name, flops in timings["flops"].items():
        if flops:
            achieved = flops / timings[name] / 1e12
            mfu = f", MFU {100 * achieved / args.peak_tflops:.1f}%" if args.peak_tflops else ""
            print(f"jaxseg {name}: {flops / 1e9:.1f} GFLOP (XLA cost analysis), {achieved:.3f} TFLOP/s{mfu}")
    print(f"jaxseg matching (cost + Hungarian, {config['num_query_blocks'] + 1} layers): "
          f"{timings['matching'] * 1e3:.1f} ms = {100 * timings['matching'] / timings['train step']:.1f}% "
          f"of the train step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
