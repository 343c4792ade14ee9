"""The GPU table in one command: EoMT-L/640 bf16 inference and training, jaxseg against transformers'
EoMT (eager and `torch.compile`), and WeakTr stage 1 on DeiT-S/224, written to benchmarks/<gpu>.md.

    python benchmarks/bench_gpu.py                          # on a GPU machine: benchmarks/<gpu>.md
    python benchmarks/bench_gpu.py --dry-run --out /tmp/gpu.md   # tiny sizes on the CPU (CI runs this)

Needs jax, torch, timm and transformers, not grain, tfds or ml_collections (the GPU machine has none):
the jaxseg rows build the methods from plain dicts and time the shipped train step
(`jaxseg.train.step.make_train_step`). Each part runs in its own process, so that JAX's and PyTorch's
allocators never share the GPU and a part that overruns the --budget (seconds for the whole script) is
stopped and reported as such while the rest still lands in the table.
Rows: inference = the network's forward, masked attention off, at batch 1 and --batch; train step = the
set loss with masking on in every query block, the recipe's AdamW with LLRD and clipping (transformers:
AdamW over EomtLoss), bf16 compute with fp32 parameters and optimizer state (PyTorch: bf16 autocast);
WeakTr stage 1 = the three soft-margin CAM losses with AAF fusion, AdamW (PyTorch reference:
jaxseg/testing/references/weaktr.py). MFU counts the FLOPs of XLA's cost analysis of jaxseg's program
(the same model arithmetic on both sides) against the device's peak bf16 dense rate.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
# Peak dense bf16 TFLOP/s by device name (SXM parts; from the vendors' data sheets).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
FULL = dict(size="L", depth=None, image=640, queries=200, classes=133, targets=100, points=12544, batch=16,
            weaktr_variant="S/16", weaktr_image=224, weaktr_batch=64, weaktr_classes=20, dtype="bfloat16", steps=10)
DRY = dict(size="S", depth=2, image=64, queries=10, classes=5, targets=4, points=256, batch=2,
           weaktr_variant="S/16", weaktr_image=64, weaktr_batch=2, weaktr_classes=3, dtype="bfloat16", steps=1)


def _eomt_setup(s: dict):
    import numpy as np
    from bench_eomt import _targets

    from jaxseg.models.eomt import eomt_config

    overrides = {"dtype": s["dtype"], **({"depth": s["depth"]} if s["depth"] else {})}
    config = eomt_config(s["size"], num_classes=s["classes"], num_queries=s["queries"], image_size=s["image"],
                         **overrides)
    if s["depth"]:
        config["num_query_blocks"] = min(config["num_query_blocks"], s["depth"])
    images = np.random.default_rng(0).random((s["batch"], s["image"], s["image"], 3), dtype=np.float32)
    return config, images, _targets(s["batch"], s["targets"], s["image"], s["classes"])


def part_eomt_jax(s: dict) -> dict:
    import flax.linen as nn
    import jax
    from bench_common import median_seconds
    from bench_eomt import _flops, bench_jax

    from jaxseg.losses.mask_classification import SetLossConfig
    from jaxseg.models.eomt import EoMT

    config, images, targets = _eomt_setup(s)
    result = bench_jax(config, images, targets, SetLossConfig(num_points=s["points"]), s["steps"])
    model = EoMT(**config)
    params = jax.jit(lambda x: nn.unbox(model.init(jax.random.key(0), x)["params"]))(images[:1])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)["mask_logits"])
    result["forward batch 1"] = median_seconds(lambda: forward(params, images[:1]).block_until_ready(), s["steps"])
    result["flops"]["forward batch 1"] = _flops(forward, params, images[:1])
    return result


def part_eomt_torch(s: dict, compiled: bool) -> dict:
    from bench_eomt import bench_torch

    config, images, targets = _eomt_setup(s)
    result = bench_torch(config, images, targets, s["points"], s["steps"], s["dtype"], compiled=compiled)
    if not compiled:
        result["forward batch 1"] = bench_torch(config, images[:1], targets, s["points"], s["steps"], s["dtype"],
                                                train=False)["forward"]
    return result


def part_weaktr(s: dict, side: str) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from bench_common import time_train_step
    from bench_weaktr import LR_STAGE1, WEIGHT_DECAY, stage1_torch

    from jaxseg.data.datasets import DataConfig
    from jaxseg.methods.weaktr import WeakTrMethod, WeakTrOptimizer
    from jaxseg.models.vit import vit_config

    classes, size, batch = s["weaktr_classes"], s["weaktr_image"], s["weaktr_batch"]
    encoder = vit_config(s["weaktr_variant"], "deit", num_cls_tokens=classes, final_norm=False, posemb_resize="dino",
                         **({"depth": s["depth"]} if s["depth"] else {}))
    labels = jnp.asarray(np.random.default_rng(0).random((batch, classes)) < 0.2, jnp.float32)
    images = jnp.asarray(np.random.default_rng(1).random((batch, size, size, 3), np.float32))
    if side == "torch":
        return stage1_torch(encoder, classes, images, labels, s["steps"])
    method = WeakTrMethod(model=dict(encoder=encoder, num_classes=classes, fusion="aaf"),
                          optimizer=WeakTrOptimizer(lr=LR_STAGE1, weight_decay=WEIGHT_DECAY), total_steps=1000,
                          batch_size=batch, data=DataConfig(name="jaxseg_scenes"), steps_per_epoch=100, crop_size=size)
    return time_train_step(method, {"image": images, "labels": labels}, s["steps"])[1]


PARTS = {"eomt-jax": part_eomt_jax,
         "eomt-torch": lambda s: part_eomt_torch(s, compiled=False),
         "eomt-torch-compile": lambda s: part_eomt_torch(s, compiled=True),
         "weaktr-jax": lambda s: part_weaktr(s, "jax"),
         "weaktr-torch": lambda s: part_weaktr(s, "torch")}


def run_part(name: str, settings: dict, deadline: float) -> dict:
    """One part in a fresh process, stopped at the deadline: its result, or {"error": why}."""
    left = deadline - time.monotonic()
    if left < 10:
        return {"error": "not started: out of the time budget"}
    command = [sys.executable, __file__, "--part", name, "--settings", json.dumps(settings)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at the time budget ({left:.0f} s left when it started)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:  # the exception's own line: the last one naming an error
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        return {"error": (errors or ["failed without output"])[-1].strip()[:200]}
    return json.loads(lines[-1][len("RESULT "):])


def _cell(result: dict, key: str, batch: int) -> str:
    return f"{batch / result[key]:.1f}" if key in result else "-"


def _mfu(result: dict, key: str, peak: float | None, flops: float | None) -> str:
    if key not in result or not peak or not flops:
        return "-"
    return f"{100 * flops / result[key] / 1e12 / peak:.1f}%"


def table(results: dict, s: dict, peak: float | None) -> list[str]:
    jax_eomt, flops = results["eomt-jax"], results["eomt-jax"].get("flops", {})
    eomt = f"EoMT-{s['size']}/{s['image']} ({s['queries']} queries, {s['targets']} targets, {s['points']} points)"
    lines = [f"## {eomt}, {s['dtype']}", "",
             f"| implementation | inference batch 1 img/s | inference batch {s['batch']} img/s | "
             f"train step batch {s['batch']} img/s | train MFU |", "|---|---|---|---|---|"]
    for name, key in (("jaxseg", "eomt-jax"), ("transformers eager", "eomt-torch"),
                      ("transformers torch.compile", "eomt-torch-compile")):
        r = results[key]
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {_cell(r, 'forward batch 1', 1)} | {_cell(r, 'forward', s['batch'])} | "
                     f"{_cell(r, 'train step', s['batch'])} | {_mfu(r, 'train step', peak, flops.get('train step'))} |")
    if "error" not in jax_eomt:
        lines += ["", f"jaxseg's train step: {(flops.get('train step') or 0) / 1e9:.0f} GFLOP (XLA cost analysis); "
                      f"matching {jax_eomt['matching'] * 1e3:.1f} ms of {jax_eomt['train step'] * 1e3:.1f} ms"
                      + (f"; peak {jax_eomt['peak GiB']:.1f} GiB" if "peak GiB" in jax_eomt else "")]
    lines += ["", f"## WeakTr stage 1, DeiT-{s['weaktr_variant']}/{s['weaktr_image']}, batch {s['weaktr_batch']}, "
                  f"{s['weaktr_classes']} classes, float32", "", "| implementation | train step img/s |", "|---|---|"]
    for name, key in (("jaxseg", "weaktr-jax"), ("PyTorch reference (eager)", "weaktr-torch")):
        r = results[key]
        lines.append(f"| {name} | {r.get('error') or _cell(r, 'train step', s['weaktr_batch'])} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (CI)")
    parser.add_argument("--out", help="the table's file (default: benchmarks/<gpu>.md)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s (default: by name)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.part:
        from bench_common import install_torch_guard

        if "torch" in args.part:
            install_torch_guard()
        print("RESULT " + json.dumps(PARTS[args.part](json.loads(args.settings))), flush=True)
        return 0

    import jax

    device = jax.devices()[0]
    settings = DRY if args.dry_run else FULL
    parts = [p for p in PARTS if not (args.dry_run and p == "eomt-torch-compile")]
    deadline = time.monotonic() + args.budget
    results = {name: run_part(name, settings, deadline) for name in parts}
    results.setdefault("eomt-torch-compile", {"error": "skipped in a dry run"})
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
    slug = "".join(c if c.isalnum() else "_" for c in device.device_kind.lower()).strip("_")
    out = pathlib.Path(args.out or HERE / f"{slug}.md")
    header = [f"# jaxseg on {device.device_kind}" + (" (dry run: tiny sizes)" if args.dry_run else ""), "",
              f"Date: {datetime.date.today()}. Machine: {device.platform} {device.device_kind}, {os.cpu_count()} "
              f"CPUs, {platform.platform()}; jax {jax.__version__}. Command: `python benchmarks/bench_gpu.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`. Medians of {settings['steps']} runs after "
              f"a warm-up; peak {peak or '?'} TFLOP/s for MFU.", ""]
    text = "\n".join(header + table(results, settings, peak)) + "\n"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
