"""Predicts images with the latest checkpoint of a training run and writes, per image, the raw label PNG
(pixel values = class ids), an overlay with a legend of the class names, and for panoptic models the
segment-id PNG (COCO encoding), its overlay and the segment list, for WeakTr stage 1 one CAM overlay per
present class (`jaxseg.visualize.PredictionWriter` lists the files).

    jaxseg-predict --workdir RUN --images DIR_OR_FILE [...] --out_dir OUT [--overwrite] [--limit N]
    jaxseg-predict --workdir RUN --dataset_split validation --out_dir OUT [--limit N]
    (or: python tools/predict.py ...)

--images takes .png / .jpg / .jpeg files and directories of them, of any size (the predictor's canvas
grows to hold them). Every image is read and checked before anything is written: 16-bit images are
scaled to 8 bits, palette, grayscale and alpha images become RGB (alpha dropped); one unreadable image
stops the run with nothing written. Outputs are named after the file names, and predictors steered by
image-level labels (WeakTr's CAMs) use the classes the model predicts. `jaxseg-make-dataset images`
writes a folder of sample images to try it on. --dataset_split predicts the first examples of a split
of the run's dataset (with their image-level labels); outputs are named after the examples' ids. --eval
picks whose predictor (default: the first evaluation of the run's config). A non-empty OUT is refused
unless --overwrite.
"""
import json
import pathlib
import sys
import time

import numpy as np
from PIL import Image

from jaxseg import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DATASET_LIMIT = 8  # examples of a --dataset_split without --limit
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes of 16-bit grayscale PNGs


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--workdir", required=True, help="run directory written by jaxseg-train")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="DIR_OR_FILE", help="image files or directories")
    inputs.add_argument("--dataset_split", metavar="SPLIT", help="a split of the run's dataset instead")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--eval", help="whose predictor to use, a name in config.evals (default: the first)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    parser.add_argument("--limit", type=int, help=f"only the first N images (default: all of --images, "
                                                  f"{DATASET_LIMIT} of a --dataset_split)")
    return parser


def image_paths(arguments: list[str]) -> list[pathlib.Path]:
    """The image files named by `arguments` (files, or directories whose images are taken in name order)."""
    paths = []
    for argument in arguments:
        path = pathlib.Path(argument)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif not path.is_file():
            raise cli.UserError(f"no image file or directory at {path}")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise cli.UserError(f"{path} is not a {'/'.join(IMAGE_SUFFIXES)} image")
        else:
            paths.append(path)
    if not paths:
        raise cli.UserError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {' '.join(arguments)}")
    stems = [p.stem for p in paths]
    clashes = sorted(str(p) for p in paths if stems.count(p.stem) > 1)
    if clashes:
        raise cli.UserError(f"images with the same name would write the same outputs: {clashes}")
    return paths


def read_image(path: pathlib.Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file: 16-bit grayscale scaled (not clipped) to 8 bits, palette,
    grayscale and alpha images converted to RGB (alpha dropped)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in SIXTEEN_BIT_MODES:
                gray = np.round(np.asarray(image, np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if image.mode == "F":
                raise cli.UserError(f"image {path} holds floating-point pixels; give 8- or 16-bit images")
            if image.mode in ("P", "PA"):  # a palette's transparency is only carried over through RGBA
                image = image.convert("RGBA")
            return np.asarray(image.convert("RGB"))
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise cli.UserError(f"cannot read image {path}: {e}") from e


def predict(args) -> int:
    from jaxseg.data.datasets import FirstExamples
    from jaxseg.inference.canvas import fitted_settings
    from jaxseg.runs import load_run
    from jaxseg.visualize import PredictionWriter

    out_dir = pathlib.Path(args.out_dir)
    if args.limit is not None and args.limit < 1:
        raise cli.UserError(f"--limit must be at least 1, got {args.limit}")
    if out_dir.exists() and not out_dir.is_dir():
        raise cli.UserError(f"--out_dir {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise cli.UserError(f"{out_dir} is not empty; pass --overwrite to write into it")
    # Every image is read (and so checked) before anything is written.
    paths = image_paths(args.images)[:args.limit] if args.images else None
    images = [{"image": read_image(p), "image_id": p.stem} for p in paths] if paths else None
    start = time.perf_counter()
    run = load_run(args.workdir)
    eval_config = run.eval_config(args.eval)
    if images is not None:
        source = images
        settings = fitted_settings(eval_config.predictor, [e["image"].shape[:2] for e in images])
        settings.pop("kind")
        if "labels" in settings:  # predictors steered by image-level labels: a photo has none
            settings["labels"] = "predicted"
    else:
        source = FirstExamples(run.source(args.dataset_split), args.limit or DATASET_LIMIT)
        settings = {}
    # Predictions only: the images may have no ground truth.
    evaluator = run.evaluator(args.eval, metrics={}, **settings)
    writer = PredictionWriter(out_dir, overwrite=args.overwrite,
                              class_names=run.parts.data.class_names(run.method.label_space))
    evaluator.run(run.params, source, on_prediction=writer)
    print(json.dumps({"images": len(source), "files": len(writer.written), "out_dir": str(out_dir),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), predict, argv)


if __name__ == "__main__":
    sys.exit(main())
