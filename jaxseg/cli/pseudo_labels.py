"""Writes WSSS pseudo-labels (palette PNGs) from a WeakTr / MCTformer checkpoint and a TFDS dataset, and a
report of CAM mIoU over a background-threshold sweep where ground truth exists.

    jaxseg-pseudo-labels --checkpoint RUN_DIR --model_config weaktr.json \\
        --data_dir DIR --dataset jaxseg_scenes/default --split train --out_dir OUT --num_foreground 8
    jaxseg-convert --input WeakTr_checkpoint_best_mIoU.pth --output weaktr_voc.msgpack
    jaxseg-pseudo-labels --checkpoint weaktr_voc.msgpack --data_dir DIR \\
        --dataset jaxseg_voc --split train_aug --ground_truth wsss --out_dir OUT --crf voc
    (or: python tools/make_pseudo_labels.py ..., python tools/convert_weights.py ...)

The checkpoint is a `jaxseg.train.checkpoint.Checkpointer` run directory whose state holds "params", or
a WeakTr params file written by `tools/convert_weights.py` (e.g. from an official WeakTr checkpoint).
The model comes from `--model_config` (a JSON file of `WeakTr` keyword arguments) or, by default, from
the params file or the run's `config.json` (written by `tools/train.py`), and so do the number of
foreground classes and the ground-truth label space (`--ground_truth`, default "categories" without a
run: "categories" when the first `--num_foreground` categories are the foreground, c -> c + 1 and other
categories -> background 0; "wsss" when the dataset's labels already are background 0 + classes 1..C,
as VOC's), and the CAM predictor's settings: which CAM (`--cam_kind`: WeakTr's fused CAM, the conv
head's "patchcam", the cross attention alone, "cross", or GETAM's gradient-weighted attention,
"gradient_attention", with the run's `gradient_score` / `gradient_start_layer`), whether the CAMs are
refined by the patch attention (`--refine` / `--no-refine`), whether PAR refines them over the image's
colours (`--par`, AFA's pixel-adaptive refinement) and the scales (`--scales`), default the
run's evaluation's, else the fused CAM, refined, at 1.0 and 1.2. The PNGs take the background threshold
that the run's last CAM evaluation found best (`eval.json`), unless `--threshold` is given. The CAMs run
through the evaluator (`jaxseg.evaluate`): on several hosts each writes the PNGs of its share.

`--crf voc` (or `coco`) refines the PNGs with WeakTr's dense CRF of that dataset, as the official
pseudo-labels (`jaxseg.wsss.crf.PSEUDO_LABEL_CRF`: unary from the labels with gt_prob 0.7 over the
background and the image's classes, 10 mean-field steps): `--crf_backend jax` (default) runs
`jaxseg.wsss.dense_crf` on the device, in batches of `--batch_size`; `--crf_backend pydensecrf` runs
pydensecrf (the optional extra: pip install 'jaxseg[crf]') in `--crf_workers` processes (default: one per
CPU). Where the dataset has ground truth the report adds the mIoU of the labels before and after the CRF.
"""
import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
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
from jaxseg.evaluate import Evaluator, merge_across_hosts
from jaxseg.methods.weaktr import PSEUDO_LABEL_THRESHOLD, CamPredictor
from jaxseg.methods.weaktr.predictors import PREDICTOR_CAM_KINDS
from jaxseg.metrics.accumulators import CamSweepMetric, SemanticMetric
from jaxseg.models.weaktr import WeakTr
from jaxseg.runs import load_run
from jaxseg.train.checkpoint import check_tree_names, restore_params
from jaxseg.visualize import label_png
from jaxseg.wsss import crf, dense_crf

DEFAULT_SCALES = (1.0, 1.2)
CRF_BACKENDS = ("jax", "pydensecrf")
GT_PROB = 0.7  # the official pseudo-labels' (tool/imutils.py crf_inference_label)


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
    parser.add_argument("--cam_kind", choices=PREDICTOR_CAM_KINDS,
                        help="which CAM makes the labels (WeakTr's --attention-type; default: the run's, else fused)")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction,
                        help="refine the CAMs by the patch attention, R = PA . M (default: the run's, else yes)")
    parser.add_argument("--par", action=argparse.BooleanOptionalAction,
                        help="refine the normalised CAMs by PAR over the image's colours (AFA's; jaxseg.wsss.par; "
                             "default: the run's, else no)")
    parser.add_argument("--threshold", type=float,
                        help="background threshold of the PNGs (default: the best of the run's last CAM "
                        f"evaluation, CHECKPOINT/eval.json, else {PSEUDO_LABEL_THRESHOLD})")
    parser.add_argument("--sweep", type=float, nargs="+", default=[round(0.05 * i, 2) for i in range(2, 20)])
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images of one size predicted together; images per call of the jax CRF")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--crf", choices=sorted(crf.PSEUDO_LABEL_CRF),
                        help="refine the PNGs with WeakTr's dense CRF of this dataset (default: no CRF)")
    parser.add_argument("--crf_backend", "--crf-backend", choices=CRF_BACKENDS,
                        help="jax: on the device, in batches of --batch_size (default); pydensecrf: the "
                        "optional extra (pip install 'jaxseg[crf]') in --crf_workers processes")
    parser.add_argument("--crf_workers", "--crf-workers", type=int,
                        help="processes of the pydensecrf backend (default: one per CPU; 1: this process)")
    return parser


def _crf_settings(args) -> tuple[str, int] | None:
    """(backend, workers) of the CRF, None without `--crf`; refuses CRF options that cannot apply."""
    if args.crf is None:
        given = [f"--{name}" for name in ("crf_backend", "crf_workers") if getattr(args, name) is not None]
        if given:
            raise cli.UserError(f"{' and '.join(given)} apply to the CRF: add --crf voc or --crf coco")
        return None
    backend = args.crf_backend or "jax"
    if backend == "jax":
        if args.crf_workers is not None:
            raise cli.UserError("--crf_workers sets the processes of --crf_backend pydensecrf; the jax backend "
                                "runs on the device")
        return backend, 1
    if args.crf_workers is not None and args.crf_workers < 1:
        raise cli.UserError(f"--crf_workers must be at least 1, got {args.crf_workers}")
    crf.require_pydensecrf()
    return backend, args.crf_workers or os.cpu_count() or 1


class _LabelWriter:
    """Writes each image's pseudo-label PNG, refined by the dense CRF when `crf_name` is set: the jax
    backend in batches of `batch_size`, pydensecrf in `workers` processes (results written in the order
    they were asked for, at most two per worker waiting). With a CRF and `targets` (ground truth) it sums
    the confusion of the labels before and after the CRF."""

    def __init__(self, out_dir: pathlib.Path, crf_name: str | None, backend: str, workers: int, batch_size: int,
                 num_labels: int, targets=None):
        self.params = crf.PSEUDO_LABEL_CRF[crf_name] if crf_name else None
        self.out_dir, self.targets, self.batch_size = out_dir, targets if self.params else None, batch_size
        self.backend, self.workers = backend, workers
        self.metrics = {"labels": SemanticMetric(num_labels), "crf": SemanticMetric(num_labels)}
        self.waiting = collections.deque()
        # spawn, not fork: a child forked from the JAX runtime's threads can deadlock. A worker that dies
        # breaks the pool, and its result raises, where multiprocessing.Pool would wait forever.
        self.pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if self.params and backend == "pydensecrf" and workers > 1 else None)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=kind is not None)

    def add(self, index: int, example: dict, prediction: dict) -> None:
        name = image_name(example, index)
        labels = np.asarray(prediction["semantic"])
        truth = None if self.targets is None else self.targets(example)["semantic"]
        if self.params is None:
            self._write(name, labels, labels, truth)
            return
        image = np.asarray(example["image"])
        # WeakTr's CRF chooses among the background and the image's classes, as its unary counts them.
        ids = np.concatenate([[0], np.asarray(prediction["cam_classes"]) + 1])
        if self.backend == "jax":
            self.waiting.append((name, labels, truth, image, ids))
            if len(self.waiting) == self.batch_size:
                self._flush_batch()
        elif self.pool is None:
            self._write(name, crf.crf_from_labels(image, labels, self.params, GT_PROB, ids), labels, truth)
        else:
            self.waiting.append((name, labels, truth, self.pool.submit(
                crf.crf_from_labels, image, labels, self.params, GT_PROB, ids)))
            if len(self.waiting) > 2 * self.workers:
                self._write_oldest()

    def _flush_batch(self) -> None:
        names, labels, truths, images, ids = zip(*self.waiting)
        self.waiting.clear()
        refined = dense_crf.crf_from_labels(images, labels, self.params, GT_PROB, ids, self.batch_size)
        for name, after, before, truth in zip(names, refined, labels, truths):
            self._write(name, after, before, truth)

    def _write_oldest(self) -> None:
        name, labels, truth, result = self.waiting.popleft()
        self._write(name, result.result(), labels, truth)

    def _write(self, name: str, labels: np.ndarray, before: np.ndarray, truth: np.ndarray | None) -> None:
        label_png(labels).save(self.out_dir / f"{name}.png")
        if truth is not None:
            for key, label_map in (("labels", before), ("crf", labels)):
                self.metrics[key].update({"confusion": self._confusion(truth, label_map)[None]})

    def _confusion(self, truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
        k = self.metrics["crf"].num_classes
        keep = truth != 255
        return np.bincount(truth[keep].astype(np.int64) * k + labels[keep], minlength=k * k).reshape(k, k)

    def finish(self) -> dict:
        """Writes what is still waiting; the labels' mIoU before and after the CRF (every host's images),
        where there is ground truth and a CRF."""
        if self.waiting and self.backend == "jax":
            self._flush_batch()
        while self.waiting:
            self._write_oldest()
        if self.targets is None:
            return {}
        merged = merge_across_hosts(self.metrics)
        return {"labels_miou": merged["labels"].result()["mean_iou"], "crf_miou": merged["crf"].result()["mean_iou"]}


def make_pseudo_labels(args) -> int:
    out_dir = pathlib.Path(args.out_dir)
    cli.check_out_dir(out_dir, args.overwrite)
    cli.check_positive(args, "limit", "batch_size", "num_foreground")
    backend, workers = _crf_settings(args) or ("jax", 1)
    network, params, settings, run_labels, run_threshold = _model(args, pathlib.Path(args.checkpoint))
    num_foreground = args.num_foreground or network.num_classes
    if network.num_classes != num_foreground:
        raise cli.UserError(f"the model has {network.num_classes} classes, --num_foreground is {num_foreground}")
    predictor = CamPredictor(
        network, num_foreground, args.ground_truth or run_labels or "categories",
        scales=args.scales or settings.get("scales", DEFAULT_SCALES),
        cam_kind=args.cam_kind or settings.get("cam_kind", "fused"),
        gradient_score=settings.get("gradient_score", "cls"),
        gradient_start_layer=settings.get("gradient_start_layer"),
        refine=settings.get("refine", True) if args.refine is None else args.refine,
        par=settings.get("par", False) if args.par is None else args.par,
        threshold=next(t for t in (args.threshold, run_threshold, PSEUDO_LABEL_THRESHOLD) if t is not None))
    source = cli.open_split(args.dataset, args.data_dir, args.split)
    count = min(len(source), args.limit or len(source))
    evaluated = "semantic" in source[0]
    evaluator = Evaluator(predictor, lambda: {"cam_sweep": CamSweepMetric(num_foreground, args.sweep)} if evaluated
                          else {}, batch_size=args.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the model loaded: bad input leaves no empty dir

    start = time.perf_counter()
    with _LabelWriter(out_dir, args.crf, backend, workers, args.batch_size, num_foreground + 1,
                      predictor.targets if evaluated else None) as writer:
        results = evaluator.run(params, FirstExamples(source, count), on_prediction=writer.add)
        results.update(writer.finish())
    report = dict(results, seconds=time.perf_counter() - start, threshold=predictor.threshold,
                  cam_kind=predictor.cam_kind, refined=predictor.refine, par=predictor.par,
                  scales=list(predictor.scales))
    if args.crf:
        report.update(crf=args.crf, crf_backend=backend)
    if jax.process_index() == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "per_class_iou"}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), make_pseudo_labels, argv)


if __name__ == "__main__":
    sys.exit(main())
