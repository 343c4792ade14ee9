"""Exports the predictor of a training run for serving: a serialized `jax.export` program (StableHLO) for
one input size that takes uint8 (B, H, W, 3) RGB images and returns the predictor's outputs, with its
metadata, into a directory that `jaxseg.serving.load` (jax and numpy only) reads (docs/export.md).

    jaxseg-export --workdir RUN --out DIR --size H [W] [--kind KIND] [--eval NAME] [--batch_size N]
                  [--params inline|npz] [--platforms cpu,cuda,tpu] [--step N] [--set key=value ...]
    (or: python tools/export.py ...)

--kind picks the predictor (EoMT: panoptic, instance, semantic; Segmenter: sliding; WeakTr: cams) with
the settings of the first evaluation of the run that uses it (or all its defaults); --eval takes the
predictor of that evaluation instead (default: the first one's). --set changes the run's config first
(e.g. --set evals.val.predictor.score_threshold=0.7). The predictor's canvas is the input size, its
window and aspect bounds are raised where they do not hold it, and WeakTr's CAMs use the classes the
model predicts. --batch_size fixes the images per call (default: any number). --params inline makes
the parameters constants of the program (one file; default); npz writes them to DIR/params.npz as the
program's input (for large models). --platforms lists where the program may run (default:
cpu,cuda,tpu). A non-empty DIR is refused unless --overwrite.
"""
import json
import pathlib
import sys
import time

from jaxseg import cli


def parser() -> cli.ArgumentParser:
    from jaxseg.export import DEFAULT_PLATFORMS, PARAMS_MODES

    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--workdir", required=True, help="run directory written by jaxseg-train")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the export into")
    parser.add_argument("--size", required=True, type=int, nargs="+", metavar="PX",
                        help="input height and width (one value: square)")
    parser.add_argument("--kind", help="predictor kind (default: that of --eval)")
    parser.add_argument("--eval", help="whose predictor settings to use, a name in config.evals")
    parser.add_argument("--batch_size", type=int, help="images per call (default: any number)")
    parser.add_argument("--params", choices=PARAMS_MODES, default="inline",
                        help="parameters as constants of the program, or in DIR/params.npz")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="comma-separated platforms to lower for (cpu, cuda, rocm, tpu)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest usable one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the run's config (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the export in a non-empty DIR")
    return parser


def export(args) -> int:
    from jaxseg.export import check_destination, export_run
    from jaxseg.runs import load_run

    if len(args.size) > 2:
        raise cli.UserError(f"--size takes one side or a height and a width, got {len(args.size)} values")
    out = pathlib.Path(args.out)
    check_destination(out, args.overwrite)
    start = time.perf_counter()
    run = load_run(args.workdir, step=args.step, overrides=args.set)
    size = args.size * 2 if len(args.size) == 1 else args.size
    exported = export_run(run, size, kind=args.kind, evaluation=args.eval, batch_size=args.batch_size,
                          params_mode=args.params, platforms=[p for p in args.platforms.split(",") if p])
    exported.save(out, overwrite=args.overwrite)
    metadata = exported.metadata
    print(json.dumps({"out": str(out), "kind": metadata["predictor"]["kind"], "step": run.step,
                      "input": metadata["input"]["shape"], "outputs": sorted(metadata["outputs"]),
                      "params": metadata["params"], "program_bytes": len(exported.program),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), export, argv)


if __name__ == "__main__":
    sys.exit(main())
