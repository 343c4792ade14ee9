"""Evaluates the latest checkpoint of a training run with its method's metrics (EoMT and Segmenter:
mIoU and pixel accuracy; WeakTr stage 1: CAM mIoU over the background-threshold sweep).

    python tools/eval.py --workdir RUN [--split validation] [--set key=value ...] [--out FILE]

The run's config.json gives the model, the dataset and the mesh; --set changes it for this evaluation
(e.g. --set dataset.data_dir=DIR; not the model, which the checkpoint fixes).
--split (default: the run's eval split) names the dataset split to evaluate. The results go to
RUN/eval_<split>_step<N>.json (N = the checkpoint's step) or --out, and their scalars to the run's
metric writer (TensorBoard and RUN/eval_<split>_metrics.jsonl, prefix "eval_<split>") at step N; the
JSON is printed. Multi-host: run the same command on every host (as tools/train.py); only process 0
writes.
"""
import argparse
import json
import logging
import pathlib
import sys

import flax.linen as nn
import jax

from jaxseg import parallel
from jaxseg.parallel import make_mesh, tree_shardings
from jaxseg.train.checkpoint import Checkpointer
from jaxseg.train.metric_writer import MetricWriter
from jaxseg.train.run import apply_overrides, build_task, dataset_sources, load_run, train_config


def evaluate_run(workdir: pathlib.Path, split: str | None, overrides: list[str], out: pathlib.Path | None,
                 overwrite: bool) -> dict:
    """Evaluates and writes the results (module docstring); returns them."""
    model_overrides = [o for o in overrides if o.partition("=")[0].split(".")[0] == "model"]
    if model_overrides:
        raise ValueError(f"{model_overrides}: the model is the checkpoint's; evaluation cannot change it")
    config, _, params = load_run(workdir)
    apply_overrides(config, overrides)
    split = split or config.dataset.eval_split
    checkpointer = Checkpointer(workdir)
    step = checkpointer.latest_step()
    checkpointer.close()
    out = out or workdir / f"eval_{split}_step{step}.json"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    config.dataset.eval_split = split
    task = build_task(config, {split: dataset_sources(config, workdir)[split]})

    training = train_config(config)
    mesh = make_mesh(training.mesh)
    # Restored params sit on one device; the evaluation's batches are spread over the whole mesh.
    shardings = tree_shardings(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)), mesh, training.rules)
    params = jax.device_put(params, nn.unbox(shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(training.rules):
        results = task.evaluate(params, mesh, training.rules)
    writer = MetricWriter(workdir)
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    writer.write(step, scalars, prefix=f"eval_{split}")
    writer.close()
    results = dict(results, step=step, split=split)
    if jax.process_index() == 0:
        out.write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory written by tools/train.py")
    parser.add_argument("--split", help="dataset split to evaluate (default: the run's eval split)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for this evaluation (repeatable)")
    parser.add_argument("--out", help="results file (default: RUN/eval_<split>_step<N>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    parallel.initialize()  # multi-host runs join here (see jaxseg/train/distributed.py); else a no-op
    try:
        results = evaluate_run(pathlib.Path(args.workdir), args.split, args.set,
                               pathlib.Path(args.out) if args.out else None, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
