"""Full fine-tuning against a frozen encoder (`optimizer.freeze_encoder`) for EoMT: quality, speed and
train-step memory, printed as markdown tables.

    python benchmarks/bench_frozen_encoder.py --steps 800 --workdir /tmp/bench_frozen

1. The embedded job (`configs/eomt/scenes.py:runlocal`, generated scenes) trained twice for --steps steps
   from the same initialisation, data order and seed, with the encoder trained and frozen: validation mIoU
   and PQ at the end, steps/s (the trainer's, from the step after the compiling one, input pipeline
   included), the wall time (dataset build, compilation and evaluation included), and the compiled train
   step's memory; then the train step alone, both settings taking turns (--rounds), which a changing
   machine load cannot favour. No pretrained backbone exists in this embedded setting, so both runs start
   from a random encoder: frozen, it stays a random feature extractor (the switch is meant for pretrained
   ones).
2. EoMT-L/640 (`configs/eomt/coco_panoptic.py:L`, the published recipe: 200 queries, 100 segments,
   12,544 points) at --large-batch images per device in --large-dtype compute (float32 params): the train
   step is only lowered and compiled from abstract shapes, never run.

Memory columns: parameter and optimizer-state bytes of the train state (exact, from `jax.eval_shape`), and
XLA's `memory_analysis()` of the compiled step: arguments (the state and the batch; the state is donated),
outputs, temporaries and their sum minus the aliased (donated) bytes as an estimate of the step's peak
(XLA on the host reports no live-range peak).
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_common import shipped_train_step

from jaxseg import methods
from jaxseg.config import apply_overrides, load_config
from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.runs import sections
from jaxseg.train.main import train_and_evaluate
from jaxseg.train.step import abstract_train_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCENES = str(ROOT / "configs" / "eomt" / "scenes.py") + ":runlocal"
LARGE = str(ROOT / "configs" / "eomt" / "coco_panoptic.py") + ":L"
MIB = 2 ** 20


def _config(spec: str, freeze: bool, overrides: list[str]):
    config = load_config(spec)
    apply_overrides(config, overrides + [f"optimizer.freeze_encoder={freeze}"])
    return config


def step_memory(config, batch_size: int) -> dict:
    """Sizes (bytes) of the train state and of the compiled train step of `config` on one device, from
    abstract shapes only."""
    parts = sections(config)
    method = methods.build(config, parts.data)
    mesh = parts.parallel.make_mesh(jax.devices()[:1])
    _, abstract, shardings = abstract_train_state(method, 0, mesh, parts.parallel.rules)
    crop, segments = method.crop_size, method.max_segments
    batch = {"image": jax.ShapeDtypeStruct((batch_size, crop, crop, 3), jnp.float32),
             "masks": jax.ShapeDtypeStruct((batch_size, segments, crop, crop), jnp.bool_),
             "labels": jax.ShapeDtypeStruct((batch_size, segments), jnp.int32),
             "valid": jax.ShapeDtypeStruct((batch_size, segments), jnp.bool_)}
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parts.parallel.rules):
        start = time.perf_counter()
        analysis = make_train_step(method, shardings).lower(state, batch).compile().memory_analysis()
        compile_seconds = time.perf_counter() - start

    def nbytes(tree):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))

    return {"params": nbytes(abstract.params), "optimizer state": nbytes(abstract.opt_state),
            "arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
            "aliased": analysis.alias_size_in_bytes, "temporaries": analysis.temp_size_in_bytes,
            "compile s": compile_seconds}


def interleaved_step_seconds(configs: dict, rounds: int) -> dict:
    """{name: median seconds of the compiled train step} of each config's method on one batch of generated
    scenes, the settings taking turns each round, so that a load that comes and goes hits both alike."""
    steps = {}
    for name, config in configs.items():
        method = methods.build(config, sections(config).data)
        rng = np.random.default_rng(0)
        scenes = (generate_scene(SceneConfig(image_size=config.data.image_size), i)
                  for i in range(config.train.batch_size))
        examples = [method.train_transform(dict(s, semantic=s["semantic"][..., None]), rng) for s in scenes]
        step, state, batch = shipped_train_step(method, {k: np.stack([e[k] for e in examples]) for k in examples[0]})
        steps[name] = [step, state, batch]
    times = {name: [] for name in configs}
    for _ in range(rounds + 1):  # the first round compiles
        for name, entry in steps.items():
            step, state, batch = entry
            start = time.perf_counter()
            entry[1], metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t[1:])) for name, t in times.items()}


def train_scenes(freeze: bool, steps: int, root: pathlib.Path) -> dict:
    """One run of the embedded job; both runs share the built dataset."""
    workdir = root / ("frozen" if freeze else "full")
    config = _config(SCENES, freeze, [f"train.total_steps={steps}", f"data.data_dir={root / 'data'}",
                                      "train.num_overlays=0", f"train.checkpoint_every={steps}"])
    start = time.perf_counter()
    results = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
    rate = [r["steps_per_second"] for r in rows if "steps_per_second" in r][-1]
    return dict(results["val"], wall=wall, steps_per_second=rate, loss=(rows[0]["loss"], rows[-1]["loss"]),
                memory=step_memory(config, config.train.batch_size))


def _memory_rows(rows: list[tuple[str, dict]]) -> None:
    print("| setting | params MiB | optimizer state MiB | arguments MiB | outputs MiB | aliased MiB | "
          "temporaries MiB | arguments + outputs + temporaries - aliased MiB | compile s |")
    print("|---|" + "---|" * 8)
    for name, m in rows:
        peak = m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]
        cells = [m[k] / MIB for k in ("params", "optimizer state", "arguments", "outputs", "aliased", "temporaries")]
        print(f"| {name} | " + " | ".join(f"{c:,.1f}" for c in cells) + f" | {peak / MIB:,.1f} | "
              f"{m['compile s']:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="training steps of each scenes run")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the interleaved step timing")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--large-batch", type=int, default=4,
                        help="EoMT-L/640 images per device (the recipe: 16 over 4 GPUs)")
    parser.add_argument("--large-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-training", action="store_true", help="only the EoMT-L/640 memory table")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"JAX {jax.__version__} on {device.platform} ({device.device_kind}), {len(jax.devices())} device(s)")

    if not args.skip_training:
        root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_frozen_"))
        runs = [(name, train_scenes(freeze, args.steps, root)) for name, freeze in (("full", False),
                                                                                  ("frozen encoder", True))]
        print(f"\n# {SCENES}, {args.steps} steps, from scratch (random encoder), workdir {root}")
        print("| setting | mIoU | PQ | PQ stuff | PQ things | loss first -> last | steps/s | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in runs:
            print(f"| {name} | {r['mean_iou']:.3f} | {r['PQ']:.3f} | {r['PQ_stuff']:.3f} | {r['PQ_things']:.3f} | "
                  f"{r['loss'][0]:.1f} -> {r['loss'][1]:.1f} | {r['steps_per_second']:.2f} | {r['wall']:.0f} |")
        print(f"\n# {SCENES}: compiled train step (batch 8)")
        _memory_rows([(name, r["memory"]) for name, r in runs])
        seconds = interleaved_step_seconds({name: _config(SCENES, freeze, []) for name, freeze in
                                            (("full", False), ("frozen encoder", True))}, args.rounds)
        print(f"\n# {SCENES}: train step alone, median of {args.rounds} interleaved rounds")
        print("| setting | step ms | steps/s |\n|---|---|---|")
        for name, value in seconds.items():
            print(f"| {name} | {value * 1e3:.1f} | {1 / value:.2f} |")

    large = []
    for name, freeze in (("full", False), ("frozen encoder", True)):
        config = _config(LARGE, freeze, [])
        # The shipped config leaves the ViT's compute dtype at its default (float32); the module takes it.
        config.model.encoder.dtype = args.large_dtype
        large.append((name, step_memory(config, args.large_batch)))
    print(f"\n# {LARGE}: EoMT-L/640 train step, batch {args.large_batch} per device, {args.large_dtype} compute, "
          "float32 params (lowered and compiled only)")
    _memory_rows(large)
    (_, full), (_, frozen) = large
    io = [m["arguments"] + m["outputs"] for m in (full, frozen)]
    print(f"frozen / full: optimizer state {frozen['optimizer state'] / full['optimizer state']:.3f}, "
          f"arguments + outputs {io[1] / io[0]:.3f}, temporaries {frozen['temporaries'] / full['temporaries']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
