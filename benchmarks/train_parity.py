"""Trains jaxseg's EoMT and transformers' EomtForUniversalSegmentation side by side and prints their
windowed training losses, final validation results and training speed as a table.

    python benchmarks/train_parity.py --config configs/eomt/scenes.py:runlocal --steps 300 --seeds 3
    python benchmarks/train_parity.py --steps 50 --same_points     # lockstep: the same random draws

Both sides start from identical weights (transformers' initialisation at the seed, converted with
`from_hf_eomt`; transformers' layer scale frozen at 1, as the config's model has none), train on identical
batches (the trainer's own pipeline at the config's `train.seed`, the same for every seed) with the
config's optimizer recipe, annealing and loss weights: jaxseg through its shipped train step, transformers
with its own EomtLoss and the official recipe re-implemented in torch (`jaxseg/testing/train_parity.py`).
A seed sets the initial weights and every random draw of both sides. `--same_points` feeds jaxseg's
masking uniforms and point draws to transformers' `torch.rand`, so the two sides stay in lockstep and
their losses differ only numerically (the table then gives the largest relative difference per window).
Both sides' final weights are evaluated by the config's first evaluation (jaxseg's predictor and
metrics). Speed: steps/s of each side's optimizer steps after the first (which compiles), timed
separately on the same machine; in lockstep both include the exchange of the draws.
"""
import argparse
import statistics
import sys
import time

import numpy as np
from bench_common import install_torch_guard

from jaxseg import methods
from jaxseg.config import apply_overrides, load_config
from jaxseg.data.pipeline import train_dataset
from jaxseg.evaluate import build_evaluator
from jaxseg.models.vit import ViT
from jaxseg.runs import sections

SIDES = ("jaxseg", "transformers")


def train_seed(method, train, source, seed: int, steps: int, same_points: bool) -> dict:
    """{side: {"losses": [...], "seconds": [...], "params": final params}} of one seed."""
    from jaxseg.testing.train_parity import HfEomtRun, JaxRun

    reference = HfEomtRun(method, seed)
    ours = JaxRun(method, reference.params(), seed, record=same_points)
    runs = {side: {"losses": [], "seconds": []} for side in SIDES}
    batches = iter(train_dataset(source, method.train_transform, seed=train.seed, batch_size=train.batch_size))
    for step in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        loss, draws = ours.step(batch)
        runs["jaxseg"]["seconds"].append(time.perf_counter() - start)
        runs["jaxseg"]["losses"].append(loss)
        start = time.perf_counter()
        runs["transformers"]["losses"].append(reference.step(batch, draws))
        runs["transformers"]["seconds"].append(time.perf_counter() - start)
        if (step + 1) % 25 == 0:
            print(f"seed {seed} step {step + 1}: " + ", ".join(f"{side} {runs[side]['losses'][-1]:.4f}"
                                                              for side in SIDES), file=sys.stderr, flush=True)
    runs["jaxseg"]["params"], runs["transformers"]["params"] = ours.params, reference.params()
    return runs


def _mean_std(values, digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: list[dict], evaluations: list[dict], window: int, same_points: bool) -> str:
    columns = ["", *SIDES] + (["max rel. difference"] if same_points else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def row(*cells):
        lines.append("| " + " | ".join(list(cells) + [""] * (len(columns) - len(cells))) + " |")

    steps = len(results[0]["jaxseg"]["losses"])
    for start in range(0, steps, window):
        stop = min(start + window, steps)
        cells = [_mean_std([np.mean(r[side]["losses"][start:stop]) for r in results], 3) for side in SIDES]
        if same_points:
            pairs = [pair for r in results for pair in zip(*(r[side]["losses"][start:stop] for side in SIDES))]
            cells.append(f"{max(abs(a - b) / abs(b) for a, b in pairs):.1e}")
        row(f"loss, steps {start + 1}-{stop}", *cells)
    for key in ("mean_iou", "PQ", "PQ_things", "PQ_stuff"):
        values = [[e[side].get(key) for e in evaluations] for side in SIDES]
        if all(v is not None for side in values for v in side):
            row(f"validation {key}", *(_mean_std(v, 3) for v in values))
    # The first step compiles (jaxseg) or warms up (transformers): the pace counts from the second.
    row("steps/s", *(_mean_std([1 / np.mean(r[side]["seconds"][1:]) for r in results], 2) for side in SIDES))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/eomt/scenes.py:runlocal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's train.total_steps; "
                        "the schedules and annealing windows follow it)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each trained on both sides")
    parser.add_argument("--window", type=int, default=25, help="steps per averaged loss row")
    parser.add_argument("--same_points", "--same-points", action="store_true",
                        help="feed jaxseg's random draws to transformers (lockstep)")
    parser.add_argument("--workdir", default="/tmp/jaxseg-train-parity", help="where the scenes are built")
    args = parser.parse_args()
    install_torch_guard()

    config = load_config(args.config)
    overrides = list(args.set) + ([f"train.total_steps={args.steps}"] if args.steps else [])
    apply_overrides(config, overrides)
    if config.model.encoder.get("posemb_covers_prefix", ViT.posemb_covers_prefix):
        # transformers' EoMT adds its position embedding to the patches only.
        config.model.encoder.posemb_covers_prefix = False
        overrides.append("model.encoder.posemb_covers_prefix=False")
    parts = sections(config)
    method = methods.build(config, parts.data)
    train = config.train
    name, evaluation = next(iter(parts.evals.items()))
    sources = parts.data.sources([parts.data.train_split, evaluation.split], args.workdir)
    evaluator = build_evaluator(method, evaluation)
    results, evaluations = [], []
    for seed in range(args.seeds):
        runs = train_seed(method, train, sources[parts.data.train_split], seed, train.total_steps,
                          args.same_points)
        evaluations.append({side: evaluator.run(runs[side].pop("params"), sources[evaluation.split])
                            for side in SIDES})
        results.append(runs)
    print(f"\n# EoMT training parity: {args.config} {' '.join(overrides)}, {train.total_steps} steps, batch "
          f"{train.batch_size}, {args.seeds} seed(s){', same point draws' if args.same_points else ''}; "
          f"evaluation {name!r} on {evaluation.split!r}" + (" (mean ± std over seeds)" if args.seeds > 1 else ""))
    print(table(results, evaluations, args.window, args.same_points))


if __name__ == "__main__":
    main()
