"""Writes WSSS pseudo-labels (palette PNGs) from a WeakTr / MCTformer checkpoint and a TFDS dataset, and a
report of CAM mIoU over a background-threshold sweep where ground truth exists.

    jaxseg-pseudo-labels --checkpoint RUN_DIR --model_config weaktr.json \\
        --data_dir DIR --dataset jaxseg_scenes/default --split train --out_dir OUT --num_foreground 8
    jaxseg-convert --input WeakTr_checkpoint_best_mIoU.pth --output weaktr_voc.msgpack
    jaxseg-pseudo-labels --checkpoint weaktr_voc.msgpack --data_dir DIR \\
        --dataset jaxseg_voc --split train_aug --ground_truth wsss --out_dir OUT
    (or: python tools/make_pseudo_labels.py ..., python tools/convert_weights.py ...)

The checkpoint is a `jaxseg.train.checkpoint.Checkpointer` run directory whose state holds "params", or
a WeakTr params file written by `tools/convert_weights.py` (e.g. from an official WeakTr checkpoint).
The model comes from `--model_config` (a JSON file of `WeakTr` keyword arguments) or, by default, from
the params file or the run's `config.json` (written by `tools/train.py`), and so do the number of
foreground classes and the ground-truth label space (`--ground_truth`, default "categories" without a
run: "categories" when the first `--num_foreground` categories are the foreground, c -> c + 1 and other
categories -> background 0; "wsss" when the dataset's labels already are background 0 + classes 1..C,
as VOC's), and the CAM predictor's settings: whether the CAMs are refined by the patch attention
(`--refine` / `--no-refine`) and the scales (`--scales`), default the run's evaluation's, else refined at
1.0 and 1.2. The PNGs take the background threshold that the run's last CAM evaluation found best
(`eval.json`), unless `--threshold` is given. The CAMs run through the evaluator (`jaxseg.evaluate`):
on several hosts each writes the PNGs of its share.
"""
import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from jaxseg import cli
from jaxseg.config import module_settings
from jaxseg.convert.params_io import load_params
from jaxseg.data.datasets import LABEL_SPACES, FirstExamples, image_name
from jaxseg.evaluate import Evaluator
from jaxseg.methods.weaktr import PSEUDO_LABEL_THRESHOLD, CamPredictor
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.weaktr import WeakTr
from jaxseg.runs import load_run
from jaxseg.train.checkpoint import check_tree_names, restore_params
from jaxseg.visualize import label_png

DEFAULT_SCALES = (1.0, 1.2)


def _model(args, checkpoint: pathlib.Path):
    """(WeakTr network, params, the run's CAM predictor settings, the run's label space, the run's best
    threshold) from the checkpoint (run directory, bare checkpoints, or params file)."""
    if checkpoint.is_file():
        file_config, params = load_params(checkpoint)
        if "encoder" not in file_config:
            # E.g. the DeiT init of a WeakTr run (convert_weights.py --num-cls-tokens): no CAM head yet.
            raise cli.UserError(f"{checkpoint} holds plain ViT params (its model config has no WeakTr 'encoder'), "
                            "not a WeakTr network with a CAM head: give a file converted from an official WeakTr "
                            "checkpoint (tools/convert_weights.py --layout weaktr) or a training run directory")
        model_config = cli.read_json(args.model_config, "--model_config") if args.model_config else file_config
        network = _network(model_config)
        check_tree_names(_abstract(network), params, f"params {checkpoint}")
        return network, params, {}, None, None
    if (checkpoint / "config.json").is_file() and not args.model_config:
        run = load_run(checkpoint)
        if not isinstance(run.method.network, WeakTr):
            raise cli.UserError(f"{checkpoint} is a run of method {run.config.method.name!r}, not a WeakTr CAM run")
        settings = dict(run.eval_config().predictor)
        run_eval = checkpoint / "eval.json"
        evaluations = json.loads(run_eval.read_text()) if run_eval.is_file() else {}
        best = next((e["best_threshold"] for e in evaluations.values() if isinstance(e, dict)
                     and "best_threshold" in e), None)
        return run.method.network, run.params, settings, run.parts.data.ground_truth, best
    if not args.model_config:
        raise cli.UserError(f"{checkpoint} holds no config.json: give the model with --model_config")
    network = _network(cli.read_json(args.model_config, "--model_config"))
    return network, restore_params(checkpoint, _abstract(network)), {}, None, None


def _network(model_config: dict) -> WeakTr:
    try:
        return WeakTr(**module_settings(model_config))
    except TypeError as e:  # a key that is not a WeakTr field, or a required one missing
        raise cli.UserError(f"the model config is not a WeakTr's keyword arguments: {e}") from e


def _abstract(network: WeakTr):
    grid, patch = network.encoder["posemb_grid"], network.encoder["patch_size"]
    example = jax.numpy.zeros((1, grid[0] * patch, grid[1] * patch, 3))
    return nn.unbox(jax.eval_shape(lambda: network.init(jax.random.key(0), example))["params"])


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, or WeakTr params file from tools/convert_weights.py")
    parser.add_argument("--model_config", help="JSON file of WeakTr keyword arguments "
                        "(default: the params file's, or the model of CHECKPOINT/config.json)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", default="jaxseg_scenes/default")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_foreground", type=int, help="default: the model's number of classes")
    parser.add_argument("--ground_truth", choices=LABEL_SPACES,
                        help="label space of the dataset's semantic maps (default: the run's config, "
                        "else categories)")
    parser.add_argument("--scales", type=float, nargs="+", help=f"default: the run's, else {DEFAULT_SCALES}")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction,
                        help="refine the CAMs by the patch attention, R = PA . M (default: the run's, else yes)")
    parser.add_argument("--threshold", type=float,
                        help="background threshold of the PNGs (default: the best of the run's last CAM "
                        f"evaluation, CHECKPOINT/eval.json, else {PSEUDO_LABEL_THRESHOLD})")
    parser.add_argument("--sweep", type=float, nargs="+", default=[round(0.05 * i, 2) for i in range(2, 20)])
    parser.add_argument("--batch_size", type=int, default=8, help="images of one size predicted together")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def make_pseudo_labels(args) -> int:
    import tensorflow_datasets as tfds

    out_dir = pathlib.Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise cli.UserError(f"--out_dir {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise cli.UserError(f"{out_dir} is not empty; pass --overwrite to write into it")
    for name in ("limit", "batch_size", "num_foreground"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise cli.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    network, params, settings, run_labels, run_threshold = _model(args, pathlib.Path(args.checkpoint))
    num_foreground = args.num_foreground or network.num_classes
    if network.num_classes != num_foreground:
        raise cli.UserError(f"the model has {network.num_classes} classes, --num_foreground is {num_foreground}")
    predictor = CamPredictor(
        network, num_foreground, args.ground_truth or run_labels or "categories",
        scales=args.scales or settings.get("scales", DEFAULT_SCALES),
        refine=settings.get("refine", True) if args.refine is None else args.refine,
        threshold=next(t for t in (args.threshold, run_threshold, PSEUDO_LABEL_THRESHOLD) if t is not None))
    try:
        source = tfds.data_source(args.dataset, data_dir=args.data_dir, split=args.split)
    except Exception as e:  # tfds raises its own errors for an unknown dataset, version or split
        raise cli.UserError(f"cannot open split {args.split!r} of dataset {args.dataset!r} in {args.data_dir}: "
                            f"{str(e).splitlines()[0]}") from e
    count = min(len(source), args.limit or len(source))
    evaluated = "semantic" in source[0]
    evaluator = Evaluator(predictor, lambda: {"cam_sweep": CamSweepMetric(num_foreground, args.sweep)} if evaluated
                          else {}, batch_size=args.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the model loaded: bad input leaves no empty dir

    def write(index: int, example: dict, prediction: dict) -> None:
        label_png(np.asarray(prediction["semantic"])).save(out_dir / f"{image_name(example, index)}.png")

    start = time.perf_counter()
    results = evaluator.run(params, FirstExamples(source, count), on_prediction=write)
    report = dict(results, seconds=time.perf_counter() - start, threshold=predictor.threshold,
                  refined=predictor.refine, scales=list(predictor.scales))
    if jax.process_index() == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "per_class_iou"}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), make_pseudo_labels, argv)


if __name__ == "__main__":
    sys.exit(main())
