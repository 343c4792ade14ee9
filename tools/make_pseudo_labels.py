"""Writes WSSS pseudo-labels (palette PNGs) from a WeakTr / MCTformer checkpoint and a TFDS dataset, and a
report of CAM mIoU over a background-threshold sweep where ground truth exists.

    python tools/make_pseudo_labels.py --checkpoint RUN_DIR --model_config weaktr.json \\
        --data_dir DIR --dataset jaxseg_scenes/default --split train --out_dir OUT --num_foreground 8
    python tools/convert_weights.py --input WeakTr_checkpoint_best_mIoU.pth --output weaktr_voc.msgpack
    python tools/make_pseudo_labels.py --checkpoint weaktr_voc.msgpack --data_dir DIR \\
        --dataset jaxseg_voc --split train_aug --ground_truth wsss --out_dir OUT

The checkpoint is a `jaxseg.train.checkpoint.Checkpointer` run directory whose state holds "params", or
a WeakTr params file written by `tools/convert_weights.py` (e.g. from an official WeakTr checkpoint).
The model comes from `--model_config` (a JSON file of `WeakTr` keyword arguments) or, by default, from
the params file or the run's `config.json` (written by `tools/train.py`), and so do the number of
foreground classes and the ground-truth label space (`--ground_truth`, default "categories" without a
run: "categories" when the first `--num_foreground` categories are the foreground, c -> c + 1 and other
categories -> background 0; "wsss" when the dataset's labels already are background 0 + classes 1..C,
as VOC's), and whether the CAMs are refined by the patch attention (`--refine` / `--no-refine`, default
the run's `refine_cams`, else refined). The PNGs take the background threshold that the run's last CAM
evaluation found best (`eval.json`), unless `--threshold` is given.
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

from jaxseg.convert.params_io import load_params
from jaxseg.data.datasets import image_name
from jaxseg.models.weaktr import WeakTr
from jaxseg.train.checkpoint import check_tree_names, restore_params
from jaxseg.train.wsss_tasks import GROUND_TRUTHS, PSEUDO_LABEL_THRESHOLD, wsss_semantic
from jaxseg.visualize import label_png
from jaxseg.wsss.cam import ThresholdSweep, image_cams, pseudo_label


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, or WeakTr params file from tools/convert_weights.py")
    parser.add_argument("--model_config", help="JSON file of WeakTr keyword arguments "
                        "(default: the params file's, or the model of CHECKPOINT/config.json)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", default="jaxseg_scenes/default")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_foreground", type=int, help="default: the model's number of classes")
    parser.add_argument("--ground_truth", choices=GROUND_TRUTHS,
                        help="label space of the dataset's semantic maps (default: the run's config, "
                        "else categories)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.2])
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction,
                        help="refine the CAMs by the patch attention, R = PA . M (default: the run's "
                        "refine_cams, else yes)")
    parser.add_argument("--threshold", type=float,
                        help="background threshold of the PNGs (default: the best of the run's last CAM "
                        f"evaluation, CHECKPOINT/eval.json, else {PSEUDO_LABEL_THRESHOLD})")
    parser.add_argument("--sweep", type=float, nargs="+", default=[round(0.05 * i, 2) for i in range(2, 20)])
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    out_dir = pathlib.Path(args.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        print(f"error: {out_dir} is not empty; pass --overwrite to write into it", file=sys.stderr)
        return 1
    checkpoint = pathlib.Path(args.checkpoint)
    file_config, file_params = None, None
    if checkpoint.is_file():
        try:
            file_config, file_params = load_params(checkpoint)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if "encoder" not in file_config:
            # E.g. the DeiT init of a WeakTr run (convert_weights.py --num-cls-tokens): no CAM head yet.
            print(f"error: {checkpoint} holds plain ViT params (its model config has no WeakTr 'encoder'), "
                  f"not a WeakTr network with a CAM head: give a file converted from an official WeakTr "
                  f"checkpoint (tools/convert_weights.py --layout weaktr) or a training run directory",
                  file=sys.stderr)
            return 1
    run_config_path = checkpoint / "config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.is_file() else {}
    if args.model_config:
        model_config = json.loads(pathlib.Path(args.model_config).read_text())
    elif file_config is not None:
        model_config = file_config
    elif "model" in run_config:
        model_config = run_config["model"]
    else:
        print(f"error: no --model_config and no model in {run_config_path}", file=sys.stderr)
        return 1
    model_config["encoder"]["posemb_grid"] = tuple(model_config["encoder"]["posemb_grid"])
    model = WeakTr(**model_config)
    args.num_foreground = args.num_foreground or model.num_classes
    ground_truth = args.ground_truth or run_config.get("dataset", {}).get("ground_truth", "categories")
    refine_cams = run_config.get("refine_cams", True) if args.refine is None else args.refine
    threshold = args.threshold
    if threshold is None:
        run_eval_path = checkpoint / "eval.json"
        run_eval = json.loads(run_eval_path.read_text()) if run_eval_path.is_file() else {}
        threshold = run_eval.get("best_threshold", PSEUDO_LABEL_THRESHOLD)
    if model.num_classes != args.num_foreground:
        print(f"error: the model has {model.num_classes} classes, --num_foreground is {args.num_foreground}",
              file=sys.stderr)
        return 1
    grid, patch = model_config["encoder"]["posemb_grid"], model_config["encoder"]["patch_size"]
    example_input = jnp.zeros((1, grid[0] * patch, grid[1] * patch, 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), example_input))["params"]
    if file_params is None:
        params = restore_params(checkpoint, abstract)
    else:
        check_tree_names(nn.unbox(abstract), file_params, f"params {checkpoint}")
        params = file_params
    source = tfds.data_source(args.dataset, data_dir=args.data_dir, split=args.split)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the model loaded: bad input leaves no empty dir

    @jax.jit
    def cam_outputs(params, views):  # params an argument, not constants baked into the compiled program
        out = model.apply({"params": params}, views)
        return out["fused_cam"], out["patch_attention"] if refine_cams else None

    def cam_fn(views):
        return cam_outputs(params, views)

    count = min(len(source), args.limit or len(source))
    sweep = ThresholdSweep(args.num_foreground, args.sweep)
    evaluated = 0
    start = time.perf_counter()
    for i in range(count):
        example = source[i]
        present = np.asarray(example["labels"][:args.num_foreground], np.float32)
        normalized = image_cams(cam_fn, example["image"], present, patch, args.scales)
        label_map = np.asarray(pseudo_label(normalized, present, threshold))
        label_png(label_map).save(out_dir / f"{image_name(example, i)}.png")
        if "semantic" in example:
            sweep.add(normalized, present, wsss_semantic(example, args.num_foreground, ground_truth))
            evaluated += 1
    report = {"examples": count, "seconds": time.perf_counter() - start, "threshold": threshold,
              "refined": refine_cams}
    if evaluated:
        report.update(sweep.result())
        report["per_class_iou"] = [None if np.isnan(v) else float(v) for v in report["per_class_iou"]]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_class_iou"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
