"""Builds a jaxseg dataset as TFDS ArrayRecord files (no TensorFlow needed).

    jaxseg-make-dataset scenes --data_dir DIR [--num_train 2000 --num_val 500
        --image_size 128 --seed 0 --hue_spread 0.3 --saturation_range 0.2 0.9 --name NAME --workers N
        --overwrite]
    jaxseg-make-dataset {voc,ade20k,cityscapes,coco_panoptic} --manual_dir DOWNLOADS --data_dir DIR
    jaxseg-make-dataset images --out_dir photos [--count 4 --image_size 128 --seed 7]
    (or: python tools/make_dataset.py ...)

The official datasets are read from their extracted downloads in DOWNLOADS (the layout each expects is
in its builder's MANUAL_DOWNLOAD_INSTRUCTIONS, jaxseg/data/builders/; a missing file is named with the
archive it comes from) and land in DIR/jaxseg_<name>/<version>; one already there is reused.

`images` writes generated scenes as plain PNG files (no labels), a folder to try `jaxseg-predict --images`
on. With the default values `scenes` builds
the built-in config `jaxseg_scenes/default`; other values get a config named after them (or --name).
The dataset lands in DIR/jaxseg_scenes/<config>/<version>; the tool prints the build time, the
number of examples and the size on disk, and how to read it back.

A dataset that is already there with the same parameters is reused, not rebuilt. One with the same
config name and version but other parameters is left alone: the tool refuses unless --overwrite is
given, which deletes and rebuilds exactly that folder (and rebuilds an identical one too).
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from etils import epath
from PIL import Image

from jaxseg import cli
from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config
from jaxseg.data.datasets import MANUAL_BUILDERS, manual_builder
from jaxseg.data.synthetic import SceneConfig, generate_scene


def _size_on_disk(path: epath.Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _stored_parameters(path: epath.Path) -> dict | None:
    """The parameters recorded in an existing dataset folder; None if it has none (not ours)."""
    metadata = path / "metadata.json"
    if not metadata.exists():
        return None
    return json.loads(metadata.read_text()).get("parameters")


def _differences(stored: dict | None, wanted: dict, prefix: str = "") -> list[str]:
    if stored is None:
        return ["no jaxseg_scenes parameters recorded there"]
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} there, {new!r} requested")
    return lines


def _report(builder, data_dir: str, seconds: float | None) -> None:
    name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
    counts = ", ".join(f"{split} {info.num_examples}" for split, info in sorted(builder.info.splits.items()))
    size = _size_on_disk(builder.data_path) / 2**20
    when = "already built" if seconds is None else f"built in {seconds:.1f} s"
    print(f"{name} {builder.version}: {when}; examples: {counts}; {size:.1f} MiB on disk "
          f"in {builder.data_path}")
    print(f'read with: tfds.data_source("{name}", data_dir="{data_dir}", split="train")')


def _build(builder, data_dir: str) -> int:
    # Nothing is downloaded: a temporary download folder keeps empty `downloads/` folders out of DIR.
    with tempfile.TemporaryDirectory() as downloads:
        start = time.perf_counter()
        builder.download_and_prepare(download_dir=downloads, file_format="array_record")
        seconds = time.perf_counter() - start
    _report(builder, data_dir, seconds)
    return 0


def build_scenes(args: argparse.Namespace) -> int:
    config = scenes_config(image_size=args.image_size, num_train=args.num_train,
                           num_val=args.num_val, seed=args.seed, name=args.name,
                           hue_spread=args.hue_spread, saturation_range=args.saturation_range)
    builder = JaxsegScenes(config=config, data_dir=args.data_dir, num_workers=args.workers)
    if builder.data_path.exists():
        differences = _differences(_stored_parameters(builder.data_path), config.parameters())
        if not args.overwrite:
            if not differences:
                _report(builder, args.data_dir, None)
                return 0
            raise cli.UserError(f"{builder.data_path} already holds a different dataset; nothing was changed; "
                                "pass --overwrite to delete and rebuild it, or --name to build beside it:\n"
                                + "\n".join(differences))
        builder.data_path.rmtree()
        # A builder made while the old files existed carries their DatasetInfo: start afresh.
        builder = JaxsegScenes(config=config, data_dir=args.data_dir, num_workers=args.workers)
    return _build(builder, args.data_dir)


def build_manual(args: argparse.Namespace) -> int:
    builder = manual_builder(f"jaxseg_{args.dataset}", args.data_dir, args.manual_dir, num_workers=args.workers)
    if builder.is_prepared():
        _report(builder, args.data_dir, None)
        return 0
    return _build(builder, args.data_dir)


def write_images(args: argparse.Namespace) -> int:
    """Generated scenes (the validation scenes' seed, not the training ones) as RGB PNG files."""
    out_dir = pathlib.Path(args.out_dir)
    if args.count < 1:
        raise cli.UserError(f"--count must be at least 1, got {args.count}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise cli.UserError(f"--out_dir {out_dir} exists and is not an empty directory")
    config = SceneConfig(image_size=args.image_size, seed=args.seed)
    scenes = [generate_scene(config, index)["image"] for index in range(args.count)]
    out_dir.mkdir(parents=True)
    for index, image in enumerate(scenes):
        Image.fromarray(image).save(out_dir / f"scene_{index:03d}.png")
    print(f"wrote {args.count} {args.image_size}x{args.image_size} images to {out_dir}")
    return 0


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(__doc__)
    datasets = parser.add_subparsers(dest="dataset", required=True)
    scenes = datasets.add_parser("scenes", help="the synthetic scenes (jaxseg_scenes)")
    scenes.add_argument("--data_dir", "--data-dir", required=True, help="TFDS data directory")
    scenes.add_argument("--num_train", "--num-train", type=int, default=2000)
    scenes.add_argument("--num_val", "--num-val", type=int, default=500)
    scenes.add_argument("--image_size", "--image-size", type=int, default=128, help="side in pixels")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--hue_spread", "--hue-spread", type=float,
                        help="hue range of a class around its own hue (default 0.3: colour is no cue)")
    scenes.add_argument("--saturation_range", "--saturation-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="saturation range of the colours (default 0.2 0.9)")
    scenes.add_argument("--name", help="config name (default: 'default' or one made of the values)")
    scenes.add_argument("--workers", type=int, help="generating processes (default: one per CPU)")
    scenes.add_argument("--overwrite", action="store_true",
                        help="delete and rebuild an existing dataset of the same config name")
    for name in MANUAL_BUILDERS:
        short = name.removeprefix("jaxseg_")
        official = datasets.add_parser(short, help=f"{name}, from its extracted official downloads")
        official.add_argument("--manual_dir", "--manual-dir", required=True, help="the extracted downloads")
        official.add_argument("--data_dir", "--data-dir", required=True, help="TFDS data directory")
        official.add_argument("--workers", type=int, help="decoding processes (default: one per CPU)")
    images = datasets.add_parser("images", help="generated scenes as PNG files, to try jaxseg-predict on")
    images.add_argument("--out_dir", "--out-dir", required=True, help="a new or empty directory")
    images.add_argument("--count", type=int, default=4)
    images.add_argument("--image_size", "--image-size", type=int, default=128, help="side in pixels")
    images.add_argument("--seed", type=int, default=7, help="scene seed (the scenes datasets use 0)")
    return parser


def make_dataset(args: argparse.Namespace) -> int:
    if args.dataset == "images":
        return write_images(args)
    return build_scenes(args) if args.dataset == "scenes" else build_manual(args)


def main(argv=None) -> int:
    return cli.run(parser(), make_dataset, argv)


if __name__ == "__main__":
    sys.exit(main())
