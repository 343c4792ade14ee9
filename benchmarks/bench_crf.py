"""WeakTr's pseudo-label CRF: the JAX dense CRF (`jaxseg.wsss.dense_crf`) against pydensecrf on the same
images and unaries: label agreement, the mIoU change of the pseudo-labels, and images/s.

    python benchmarks/bench_crf.py --sizes 128 384 --images 16

Inputs: generated scenes (`jaxseg.data.synthetic`, the default config at each of --sizes, things as the
foreground as in the WSSS chain) with CAM-like pseudo-labels made from their ground truth
(`jaxseg.testing.crf.cam_like_labels`: masks averaged over --cell px cells, upsampled, smooth noise of
amplitude --noise). The CRF is WeakTr's stage-1 one (`PSEUDO_LABEL_CRF`, VOC and COCO parameters):
unary from the labels with gt_prob 0.7 over the background and the image's classes, 10 mean-field steps.

Columns:
  agreement           pixels whose JAX label equals pydensecrf's, of all pixels and of the pixels whose
                      label pydensecrf's CRF changed;
  mIoU                of the pseudo-labels against the ground truth (background + 6 things, 255 ignored),
                      before the CRF and after each;
  img/s               pydensecrf in one process and in --workers processes (spawned, as
                      `jaxseg-pseudo-labels --crf_backend pydensecrf` runs it), the JAX CRF in batches of
                      --batch (as the tool's jax backend: padded to 32 px canvases and power-of-two label
                      counts); timed on a second pass over the images, after the first one compiled
                      (its extra time is the compile column).
--no-pydensecrf times the JAX side alone (no reference needed).
"""
import argparse
import concurrent.futures
import multiprocessing
import sys
import time

import jax
import numpy as np

from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.metrics import miou_from_confusion
from jaxseg.testing.crf import cam_like_labels
from jaxseg.wsss import crf, dense_crf
from jaxseg.wsss.cam import foreground_labels

GT_PROB = 0.7


def make_scenes(size: int, count: int, cell: int, noise: float) -> list[tuple]:
    """(image, ground truth, CAM-like labels, ids the CRF chooses from) of scenes 0..count-1."""
    config = SceneConfig(image_size=size)
    rng = np.random.default_rng(0)
    scenes = []
    for index in range(count):
        scene = generate_scene(config, index)
        truth = foreground_labels(scene["semantic"], config.num_thing_classes)
        ids = np.concatenate([[0], np.flatnonzero(scene["labels"][:config.num_thing_classes]) + 1])
        scenes.append((scene["image"], truth, cam_like_labels(truth, rng, cell, noise), ids))
    return scenes


def miou(truths, label_maps, num_classes: int) -> float:
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for truth, labels in zip(truths, label_maps):
        keep = truth != 255
        confusion += np.bincount(truth[keep] * num_classes + labels[keep],
                                 minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return float(miou_from_confusion(confusion)["mean_iou"])


def timed_twice(fn, *args):
    """(fn(*args), seconds of the second call, extra seconds of the first: compilation, pool start)."""
    start = time.perf_counter()
    fn(*args)
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = fn(*args)
    second = time.perf_counter() - start
    return result, second, first - second


def run_jax(scenes, params, batch: int) -> list[np.ndarray]:
    out = []
    for b in range(0, len(scenes), batch):
        chunk = scenes[b:b + batch]
        out += dense_crf.crf_from_labels([s[0] for s in chunk], [s[2] for s in chunk], params, GT_PROB,
                                         [s[3] for s in chunk], batch)
    return out


def run_pydensecrf(scenes, params, pool=None) -> list[np.ndarray]:
    tasks = [(image, labels, params, GT_PROB, ids) for image, _, labels, ids in scenes]
    if pool is None:
        return [crf.crf_from_labels(*task) for task in tasks]
    return [f.result() for f in [pool.submit(crf.crf_from_labels, *task) for task in tasks]]


def row(scenes, name: str, args, pool, num_classes: int) -> list[str]:
    """The table cells after "size" of one CRF on `scenes`."""
    params = crf.PSEUDO_LABEL_CRF[name]
    truths, inputs = [s[1] for s in scenes], [s[2] for s in scenes]
    ours, jax_seconds, compile_seconds = timed_twice(run_jax, scenes, params, args.batch)
    cells = [name]
    if pool is None:
        cells += ["-", "-", f"{miou(truths, inputs, num_classes):.4f}", "-", f"{miou(truths, ours, num_classes):.4f}",
                  "-", "-"]
    else:
        reference, one_seconds, _ = timed_twice(run_pydensecrf, scenes, params)
        _, pool_seconds, _ = timed_twice(run_pydensecrf, scenes, params, pool)
        same = np.concatenate([(a == b).ravel() for a, b in zip(ours, reference)])
        changed = np.concatenate([(r != i).ravel() for r, i in zip(reference, inputs)])
        on_changed = f"{same[changed].mean():.4f}" if changed.any() else "-"
        cells += [f"{same.mean():.5f}", f"{on_changed} ({changed.mean():.3f})",
                  f"{miou(truths, inputs, num_classes):.4f}", f"{miou(truths, reference, num_classes):.4f}",
                  f"{miou(truths, ours, num_classes):.4f}", f"{len(scenes) / one_seconds:.2f}",
                  f"{len(scenes) / pool_seconds:.2f}"]
    return cells + [f"{len(scenes) / jax_seconds:.2f}", f"{compile_seconds:.1f}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 384], help="scene sizes in px")
    parser.add_argument("--images", type=int, default=16, help="scenes per size")
    parser.add_argument("--cell", type=int, default=16, help="CAM cell of the pseudo-labels, px")
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4, help="images per JAX CRF call")
    parser.add_argument("--workers", type=int, default=2, help="pydensecrf processes of the pool row")
    parser.add_argument("--crf", nargs="+", default=["voc", "coco"], choices=sorted(crf.PSEUDO_LABEL_CRF))
    parser.add_argument("--no-pydensecrf", action="store_true", help="time the JAX CRF alone")
    args = parser.parse_args(argv)
    num_classes = SceneConfig().num_thing_classes + 1
    pool = None
    if not args.no_pydensecrf:
        crf.require_pydensecrf()
        pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    print(f"# WeakTr pseudo-label CRF: JAX ({jax.devices()[0].device_kind}, batch {args.batch}) vs pydensecrf, "
          f"{args.images} scenes per size, CAM-like labels (cell {args.cell} px, noise {args.noise})")
    print("| size | CRF | agreement | agreement where pydensecrf changed the label (changed) | mIoU before | "
          f"mIoU pydensecrf | mIoU JAX | pydensecrf img/s | pydensecrf x{args.workers} img/s | JAX img/s | "
          "JAX compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for size in args.sizes:
            scenes = make_scenes(size, args.images, args.cell, args.noise)
            for name in args.crf:
                print("| " + " | ".join([str(size)] + row(scenes, name, args, pool, num_classes)) + " |", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
