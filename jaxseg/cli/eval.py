"""Evaluates a checkpoint of a training run with one of its configured evaluations (EoMT: PQ and mIoU, or
mask AP; Segmenter: mIoU; WeakTr stage 1: CAM mIoU over the background-threshold sweep).

    jaxseg-eval --workdir RUN [--eval val] [--split validation] [--step N] [--set key=value ...]
    (or: python tools/eval.py ...)

The run's config.json gives the model, the data, the evaluations and the mesh; --set changes it for this
evaluation (e.g. --set data.data_dir=DIR or --set evals.val.batch_size=16; not the model, which the
checkpoint fixes). --eval names the evaluation (default: the first of config.evals), --split its dataset
split (default: the evaluation's), --step the checkpoint (default: the latest usable one). The results go
to RUN/eval_<eval>_<split>_step<N>.json (or --out) and their scalars to the run's metric writer
(TensorBoard and RUN/eval_<eval>_<split>_metrics.jsonl) at step N; the JSON is printed. --print_config
prints the run's config with the overrides applied and exits. Multi-host: run the same command on every
host (as jaxseg-train); each host evaluates its share and only process 0 writes.
"""
import json
import pathlib
import sys

from jaxseg import cli


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--workdir", required=True, help="run directory written by jaxseg-train")
    parser.add_argument("--eval", help="name of the evaluation in config.evals (default: the first)")
    parser.add_argument("--split", help="dataset split to evaluate (default: the evaluation's)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest usable one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for this evaluation (repeatable)")
    parser.add_argument("--out", help="results file (default: RUN/eval_<eval>_<split>_step<N>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    parser.add_argument("--print_config", action="store_true",
                        help="print the run's config (after --set) as JSON and exit")
    return parser


def evaluate_run(workdir: pathlib.Path, *, name: str | None = None, split: str | None = None, step: int | None = None,
                 overrides: list[str] = (), out: pathlib.Path | None = None, overwrite: bool = False) -> dict:
    """Evaluates and writes the results (module docstring); returns them."""
    import jax

    from jaxseg.runs import load_run
    from jaxseg.train.metric_writer import MetricWriter

    run = load_run(workdir, step=step, overrides=list(overrides))
    eval_config = run.eval_config(name, split=split)
    name = name or next(iter(run.parts.evals))
    out = out or workdir / f"eval_{name}_{eval_config.split}_step{run.step}.json"
    if out.exists() and not overwrite:
        raise cli.UserError(f"{out} exists; pass --overwrite to replace it")
    results = run.evaluator(name, split=eval_config.split).run(run.params, run.source(eval_config.split))
    writer = MetricWriter(workdir)
    writer.write(run.step, {k: v for k, v in results.items() if isinstance(v, (int, float))},
                 prefix=f"eval_{name}_{eval_config.split}")
    writer.close()
    results = dict(results, step=run.step, split=eval_config.split, eval=name)
    if jax.process_index() == 0:
        out.write_text(json.dumps(results, indent=1))
    return results


def evaluate(args) -> int:
    import jax

    from jaxseg import parallel

    workdir = pathlib.Path(args.workdir)
    if args.print_config:
        from jaxseg.runs import run_config

        print(run_config(workdir, args.set).to_json(indent=1))
        return 0
    parallel.initialize()  # multi-host runs join here (see jaxseg/parallel.py); else a no-op
    results = evaluate_run(workdir, name=args.eval, split=args.split, step=args.step, overrides=args.set,
                           out=pathlib.Path(args.out) if args.out else None, overwrite=args.overwrite)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in results.items() if k != "per_class_iou"}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
