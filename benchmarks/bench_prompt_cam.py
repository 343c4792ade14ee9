"""Where Prompt-CAM's trait maps look, against the backbone's own class-token attention, on a run's split.

    python benchmarks/bench_prompt_cam.py measure --run PROMPT_CAM_RUN [--split validation]

It runs the run's evaluation twice over the split, with the predictor's two sources
(`jaxseg.methods.prompt_cam.TraitMapPredictor`): "prompts", each present class's prompt attention in the
last block (the trait maps), and "class_token", the frozen backbone's own class-token attention in its
last block without prompts (WeakTr's encoder has one class token per class: token c for class c). For
each it prints, per head, the share of the attention mass over the patches that falls inside the
ground-truth region of the class (`jaxseg.metrics.attention_mass`, averaged over (image, present class)
pairs), the share a uniform map would get (the class's area), and the CAM mIoU of the head-mean maps
(`cam_sweep`). The comparison means something only for a frozen backbone (`optimizer.freeze_encoder`):
then both sources read the same encoder weights.
"""
import argparse
import json
import platform
import sys
import time

import jax


def measure(run_dir: str, split: str) -> dict:
    from jaxseg.runs import load_run

    run = load_run(run_dir)
    name = next(iter(run.parts.evals))
    metrics = {"cam_sweep": {}, "attention_mass": {}}
    results = {}
    for source in ("prompts", "class_token"):
        start = time.perf_counter()
        evaluator = run.evaluator(name, split=split, metrics=metrics, source=source)
        results[source] = evaluator.run(run.params, run.source(split))
        results[source]["seconds"] = time.perf_counter() - start
    frozen = run.config.optimizer.get("freeze_encoder", True)
    print(f"run {run_dir} (step {run.step}, vpt {run.config.model.vpt}, encoder "
          f"{'frozen' if frozen else 'trained too'}), split {split}, "
          f"{results['prompts']['examples']} images, {results['prompts']['class_pairs']} (image, class) pairs; "
          f"{platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    heads = len(results["prompts"]["attention_mass_per_head"])
    print("| attention | " + " | ".join(f"head {h}" for h in range(heads)) + " | mean | best | CAM mIoU |")
    print("|---|" + "---|" * (heads + 3))
    for source, label in (("prompts", "class prompt (trait map)"), ("class_token", "backbone class token")):
        r = results[source]
        cells = " | ".join(f"{v:.3f}" for v in r["attention_mass_per_head"])
        print(f"| {label} | {cells} | {r['attention_mass_mean']:.3f} | {r['attention_mass_best']:.3f} | "
              f"{r['cam_miou']:.3f} (t={r['best_threshold']}) |")
    print("| uniform map (class area) | " + " | ".join(f"{results['prompts']['area_fraction']:.3f}"
                                                       for _ in range(heads)) + " | | | |")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    measure_parser = commands.add_parser("measure", help="trait maps against class-token attention")
    measure_parser.add_argument("--run", required=True)
    measure_parser.add_argument("--split", default="validation")
    measure_parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = measure(args.run, args.split)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
