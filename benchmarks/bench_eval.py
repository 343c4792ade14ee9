"""Evaluation throughput on the generated scenes' validation split: the per-image loop the methods used
before the evaluator (every image its own jitted forward and post-processing at its own size, then the
metrics on the host) against `jaxseg.evaluate.Evaluator` (padded batches, one compiled program for
prediction and metric statistics).

    python benchmarks/bench_eval.py [--batch 8] [--images 96] [--repeats 2]

Rows: EoMT panoptic + semantic (PQ and mIoU of one forward), Segmenter multi-scale + flip windows, WeakTr
CAM threshold sweep, each with its runlocal scenes config and untrained weights (the speed does not
depend on them). Images/s of the second full pass over the split (the first one compiles); both paths are
checked to give the same metrics.
"""
import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import methods
from jaxseg.config import apply_overrides, load_config
from jaxseg.evaluate import build_evaluator
from jaxseg.inference.mask_classification import panoptic_segments, semantic_scores
from jaxseg.metrics import confusion_matrix, panoptic_stats
from jaxseg.metrics.accumulators import SemanticMetric
from jaxseg.models.weaktr import select_cam
from jaxseg.ops.image import normalize
from jaxseg.runs import sections
from jaxseg.testing import per_image
from jaxseg.wsss.cam import image_cams

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = {"eomt panoptic + semantic": "configs/eomt/scenes.py:runlocal",
           "segmenter multi-scale + flip": "configs/segmenter/scenes.py:runlocal",
           "weaktr CAM sweep": "configs/weaktr/scenes_cam.py:runlocal"}


def per_image_loop(method, predictor, metrics, params, source):
    """The per-image evaluation: one jitted call per image at its own size, metrics fed per image."""
    kind = type(predictor).__name__
    if kind == "PanopticPredictor":
        def outputs(params, image):
            def final(images):
                out = method.network.apply({"params": params}, images)
                return out["class_logits"][-1], out["mask_logits"][-1]
            class_logits, mask_logits = per_image.padded_square_logits(final, image / 255, method.crop_size)
            ids, categories = panoptic_segments(class_logits, mask_logits, method.is_thing)
            semantic = jnp.argmax(semantic_scores(class_logits, mask_logits), axis=0)
            return semantic, ids, categories
        run = jax.jit(outputs)
        for index in range(len(source)):
            example = source[index]
            target = predictor.targets(example)
            semantic, ids, categories = run(params, jnp.asarray(example["image"], jnp.float32))
            for metric in metrics.values():
                if isinstance(metric, SemanticMetric):
                    stats = {"confusion": confusion_matrix(target["semantic"], semantic, metric.num_classes)}
                else:
                    segments = target["segments"]
                    predicted = categories[1:]
                    stats = panoptic_stats(ids, jnp.maximum(predicted, 0), target["panoptic"], segments["category_id"],
                                           segments["iscrowd"], metric.num_classes, pred_valid=predicted >= 0)
                metric.update(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], stats))
    elif kind == "MultiScaleFlipPredictor":
        def semantic(params, image):
            probs = per_image.multiscale_flip_probs(
                lambda windows: predictor._log_scores(params, windows), normalize(image / 255), predictor.scales,
                base_short_side=method.base_size, window=method.crop_size, stride=predictor.stride)
            return jnp.argmax(probs, axis=0)
        run = jax.jit(semantic)
        for index in range(len(source)):
            example = source[index]
            prediction = run(params, jnp.asarray(example["image"], jnp.float32))
            metric = metrics["semantic"]
            stats = {"confusion": confusion_matrix(predictor.targets(example)["semantic"], prediction,
                                                   metric.num_classes)}
            metric.update(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], stats))
    else:
        def cams(params, image, labels):
            def cam_fn(views):
                out = method.network.apply({"params": params}, views)
                return select_cam(out, predictor.cam_kind), out["patch_attention"] if predictor.refine else None
            return image_cams(cam_fn, image, labels, predictor.patch, predictor.scales)
        run = jax.jit(cams)
        metric = metrics["cam_sweep"]
        stats_fn = jax.jit(metric.stats)
        for index in range(len(source)):
            example = source[index]
            target = predictor.targets(example)
            prediction = {"cams": run(params, np.asarray(example["image"]), target["labels"])}
            stats = stats_fn(prediction, metric.targets(target, example["image"].shape[:2]))
            metric.update(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], stats))
    results = {}
    for metric in metrics.values():
        results.update(metric.result())
    return results


def timed(fn, repeats):
    fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def compare(spec: str, args) -> tuple:
    """(per-image loop seconds, evaluator seconds, metric name, its value, whether the metrics agree)."""
    config = load_config(str(ROOT / spec))
    apply_overrides(config, [f"data.num_val={args.images}", f"data.data_dir={args.data_dir}",
                             f"evals.val.batch_size={args.batch}"])
    parts = sections(config)
    method = methods.build(config, parts.data)
    source = parts.data.sources(["validation"], args.data_dir)["validation"]
    params = nn.unbox(jax.jit(method.init_params)(jax.random.PRNGKey(0)))
    evaluator = build_evaluator(method, parts.evals["val"])
    loop_seconds, loop_results = timed(
        lambda: per_image_loop(method, evaluator.predictor, evaluator.make_metrics(), params, source), args.repeats)
    batched_seconds, batched_results = timed(lambda: evaluator.run(params, source), args.repeats)
    key = next(k for k in ("PQ", "cam_miou", "mean_iou") if k in batched_results)
    agree = all(np.isclose(batched_results[k], loop_results[k], rtol=1e-5, atol=1e-7)
                for k in loop_results if isinstance(loop_results[k], float))
    return loop_seconds, batched_seconds, key, batched_results[key], agree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=96, help="validation images of the scenes build")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data_dir", default="/tmp/jaxseg-bench-eval-data")
    args = parser.parse_args(argv)
    rows = [(name, *compare(spec, args)) for name, spec in CONFIGS.items()]
    print(f"# Evaluation throughput, {args.images} scenes (64 px), {jax.devices()[0].device_kind}, "
          f"batch {args.batch}")
    print("| evaluation | per-image loop img/s | evaluator img/s | speed-up | metrics agree |")
    print("|---|---|---|---|---|")
    for name, loop, batched, key, value, agree in rows:
        print(f"| {name} | {args.images / loop:.1f} | {args.images / batched:.1f} | {loop / batched:.2f}x | "
              f"{'yes' if agree else 'NO'} ({key} {value:.4f}) |")
    print(json.dumps({name: {"loop_s": loop, "evaluator_s": batched} for name, loop, batched, *_ in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
