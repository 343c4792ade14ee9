"""Writes CLIP-ES pseudo-labels (palette PNGs in WeakTr's layout: 0 background, class c as c + 1) from a
converted CLIP and a TFDS dataset with image-level labels, and a report of CAM mIoU over a background
threshold sweep where ground truth exists (`jaxseg.wsss.clip_es`, docs/clip_es.md).

    jaxseg-convert --input clip-vit-base-patch16/model.safetensors --layout clip --output clip_b16.msgpack
    jaxseg-clip-es --clip clip_b16.msgpack --tokenizer clip-vit-base-patch16 --classes voc \\
        --data_dir DIR --dataset jaxseg_voc --split train_aug --ground_truth wsss --out_dir OUT
    (or: python tools/clip_es.py ...)

The PNGs are named as `jaxseg-pseudo-labels` names them, so WeakTr's stage 2 trains on them unchanged
(`data.pseudo_labels_dir=OUT`).
Text: `--classes voc` / `coco` take CLIP-ES's class names (synonym-expanded), background words and CAA box
threshold (0.4 / 0.7); `--classes FILE` reads one class name per line, in the dataset's class order, and
then needs `--background FILE` (one word per line) and `--box_threshold`. The prompts are tokenized offline:
`--tokenizer DIR` is a local transformers CLIP tokenizer (vocab.json, merges.txt), or `--token_ids FILE.npz`
holds the ids ("classes": (C x T, L) class-major over the T templates, "background": (K x T, L)).
Background: CLIP-ES scores it (1 - max CAM)^p; `--background_power p` (default 1, as its released pseudo-masks)
or a plain `--threshold`. On several hosts each writes the PNGs of its share.
"""
import json
import pathlib
import sys
import time

import jax
import numpy as np

from jaxseg import cli
from jaxseg.convert.clip import abstract_params
from jaxseg.convert.params_io import load_params
from jaxseg.data.datasets import LABEL_SPACES, FirstExamples, image_name
from jaxseg.evaluate import Evaluator
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.clip import CLIP
from jaxseg.train.checkpoint import check_tree_names
from jaxseg.visualize import label_png
from jaxseg.wsss import clip_es

# The default sweep plus the thresholds of CLIP-ES's background powers 1 and 2.
DEFAULT_SWEEP = sorted({round(0.05 * i, 2) for i in range(2, 20)} | {round(clip_es.power_background_threshold(2), 4)})


def _lines(path: str, what: str) -> list[str]:
    lines = [line.strip() for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise cli.UserError(f"{what} {path} names nothing (one entry per line)")
    return lines


def _text_setup(args) -> tuple[list[str], list[str], float]:
    """(class names, background words, box threshold)."""
    if args.classes in clip_es.DATASETS:
        names, background, box_threshold = clip_es.DATASETS[args.classes]
        names, background = list(names), list(background)
    else:
        if not args.background or args.box_threshold is None:
            raise cli.UserError(f"--classes {args.classes} is a file of class names: give the background words "
                                f"(--background FILE) and --box_threshold too")
        names, box_threshold = _lines(args.classes, "--classes"), None
    if args.background:
        background = _lines(args.background, "--background")
    return names, background, args.box_threshold if args.box_threshold is not None else box_threshold


def _token_ids(args, names, background, templates, context_length) -> tuple[np.ndarray, np.ndarray]:
    if args.token_ids:
        with np.load(args.token_ids) as f:
            if not {"classes", "background"} <= set(f.files):
                raise cli.UserError(f"--token_ids {args.token_ids} must hold arrays 'classes' and 'background', "
                                    f"has {sorted(f.files)}")
            ids = f["classes"], f["background"]
        for key, array, count in zip(("classes", "background"), ids, (len(names), len(background))):
            if array.ndim != 2 or array.shape[0] != count * len(templates):
                raise cli.UserError(f"--token_ids '{key}' must be ({count} x {len(templates)} templates, length), "
                                    f"got shape {array.shape}")
        return ids
    tokenizer = clip_es.load_tokenizer(args.tokenizer)
    return tuple(clip_es.tokenize(tokenizer, clip_es.prompt_texts(words, templates), context_length)
                 for words in (names, background))


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--clip", required=True, help="CLIP params file from jaxseg-convert --layout clip")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--tokenizer", help="local directory of a transformers CLIP tokenizer")
    text.add_argument("--token_ids", help=".npz of precomputed prompt token ids ('classes', 'background')")
    parser.add_argument("--classes", default="voc",
                        help=f"{' or '.join(clip_es.DATASETS)} (CLIP-ES's names), or a file of class names")
    parser.add_argument("--background", help="file of background words (default: CLIP-ES's for --classes)")
    parser.add_argument("--templates", nargs="+", default=list(clip_es.TEMPLATES),
                        help="prompt templates with one {} (several: a prompt ensemble)")
    parser.add_argument("--box_threshold", type=float, help="CAA box threshold (default: CLIP-ES's)")
    parser.add_argument("--affinity_layers", type=int, default=clip_es.AFFINITY_LAYERS)
    background = parser.add_mutually_exclusive_group()
    background.add_argument("--background_power", type=float, default=clip_es.BACKGROUND_POWER,
                            help="background score (1 - max CAM)^p of the PNGs")
    background.add_argument("--threshold", type=float, help="plain background threshold of the PNGs")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", default="jaxseg_voc")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--ground_truth", choices=LABEL_SPACES, default="categories",
                        help="label space of the dataset's semantic maps")
    parser.add_argument("--sweep", type=float, nargs="+", default=DEFAULT_SWEEP)
    parser.add_argument("--batch_size", type=int, default=8, help="images of one size predicted together")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def make_pseudo_labels(args) -> int:
    out_dir = pathlib.Path(args.out_dir)
    cli.check_out_dir(out_dir, args.overwrite)
    cli.check_positive(args, "limit", "batch_size")
    config, params = load_params(pathlib.Path(args.clip))
    if not {"vision", "text"} <= set(config):
        raise cli.UserError(f"{args.clip} holds no CLIP (its model config has no 'vision' and 'text' towers): "
                            f"convert a CLIP checkpoint with jaxseg-convert --layout clip")
    check_tree_names(abstract_params(config), params, f"params {args.clip}")
    model = CLIP(**config)
    names, background, box_threshold = _text_setup(args)
    templates = tuple(args.templates)
    ids = _token_ids(args, names, background, templates, config["text"].get("context_length", 77))
    text = np.concatenate([clip_es.text_features(model, params, i, len(templates)) for i in ids])
    threshold = (args.threshold if args.threshold is not None
                 else clip_es.power_background_threshold(args.background_power))
    predictor = clip_es.ClipEsPredictor(model, text, len(names), args.ground_truth, box_threshold=box_threshold,
                                        threshold=threshold, affinity_layers=args.affinity_layers)
    source = cli.open_split(args.dataset, args.data_dir, args.split)
    count = min(len(source), args.limit or len(source))
    evaluated = "semantic" in source[0]
    evaluator = Evaluator(predictor, lambda: {"cam_sweep": CamSweepMetric(len(names), args.sweep)} if evaluated
                          else {}, batch_size=args.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once everything loaded: bad input leaves no empty dir

    def write(index: int, example: dict, prediction: dict) -> None:
        label_png(np.asarray(prediction["semantic"])).save(out_dir / f"{image_name(example, index)}.png")

    start = time.perf_counter()
    results = evaluator.run(params, FirstExamples(source, count), on_prediction=write)
    report = dict(results, seconds=time.perf_counter() - start, threshold=threshold, box_threshold=box_threshold,
                  classes=names, background=background, templates=list(templates))
    if jax.process_index() == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k not in ("per_class_iou", "classes", "background")}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), make_pseudo_labels, argv)


if __name__ == "__main__":
    sys.exit(main())
