"""Builds a jaxseg dataset as TFDS ArrayRecord files (no TensorFlow needed).

    jaxseg-make-dataset scenes --data_dir DIR [--num_train 2000 --num_val 500
        --image_size 128 --seed 0 --hue_spread 0.3 --saturation_range 0.2 0.9 --name NAME --workers N
        --overwrite]
    jaxseg-make-dataset {voc,ade20k,cityscapes,coco_panoptic} --manual_dir DOWNLOADS --data_dir DIR
    jaxseg-make-dataset images --out_dir photos [--count 4 --image_size 128 --seed 7]
    jaxseg-make-dataset folder --root FOLDER --data_dir DIR [--name NAME --label_space categories|wsss
        --image_labels FILE --workers N --overwrite]
    jaxseg-make-dataset export-scenes --out_dir FOLDER [--layout semantic|coco_panoptic --num_train 400
        --num_val 48 --image_size 64 --seed 0 --hue_spread H --saturation_range MIN MAX]
    (or: python tools/make_dataset.py ...)

The official datasets are read from their extracted downloads in DOWNLOADS (the layout each expects is
in its builder's MANUAL_DOWNLOAD_INSTRUCTIONS, jaxseg/data/builders/; a missing file is named with the
archive it comes from) and land in DIR/jaxseg_<name>/<version>; one already there is reused.

`images` writes generated scenes as plain PNG files (no labels), a folder to try `jaxseg-predict --images`
on.

`folder` builds your own dataset from FOLDER (layouts: jaxseg/data/builders/folder.py, docs/own_data.md)
into DIR/jaxseg_folder/NAME/<version> (NAME: the folder's name unless given), every file checked first;
configs read it with `--set data.name=jaxseg_folder/NAME --set data.data_dir=DIR`. One already built
from the same folder with the same options is reused (files changed since: rebuild with --overwrite).
`export-scenes` writes the generated scenes (by default those of the runlocal configs) as such a folder.

With the default values `scenes` builds the built-in config `jaxseg_scenes/default`; other values get a
config named after them (or --name). The dataset lands in DIR/jaxseg_scenes/<config>/<version>; the tool
prints the build time, the number of examples and the size on disk, and how to read it back.

A dataset that is already there with the same parameters is reused, not rebuilt. One with the same
config name and version but other parameters is left alone: the tool refuses unless --overwrite is
given, which deletes and rebuilds exactly that folder (and rebuilds an identical one too).
"""
import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time

from etils import epath
from PIL import Image

from jaxseg import cli
from jaxseg.data.builders.folder import LABEL_SPACES, LAYOUTS, FolderConfig, JaxsegFolder, export_scenes
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
        return ["no parameters recorded there"]
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


def build_folder(args: argparse.Namespace) -> int:
    root = pathlib.Path(args.root).expanduser()
    name = args.name or re.sub(r"[^\w+.-]", "_", root.resolve().name)
    config = FolderConfig(name=name, root=str(root), label_space=args.label_space, image_labels=args.image_labels or "")
    builder = JaxsegFolder(config=config, data_dir=args.data_dir, num_workers=args.workers)  # reads the layout
    if builder.data_path.exists():
        differences = _differences(_stored_parameters(builder.data_path), config.parameters())
        if not args.overwrite:
            if not differences:
                _report(builder, args.data_dir, None)
                _print_settings(builder, args.data_dir)
                return 0
            raise cli.UserError(f"{builder.data_path} already holds a different dataset; nothing was changed; "
                                "pass --overwrite to delete and rebuild it, or --name to build beside it:\n"
                                + "\n".join(differences))
        builder.check()  # a folder that fails its checks leaves the old build in place
        builder.data_path.rmtree()
        builder = JaxsegFolder(config=config, data_dir=args.data_dir, num_workers=args.workers)
    _build(builder, args.data_dir)
    _print_settings(builder, args.data_dir)
    return 0


def _print_settings(builder: JaxsegFolder, data_dir: str) -> None:
    layout = builder.layout
    things = "" if layout.num_things is None else f", {layout.num_things} things (classes 0..{layout.num_things - 1})"
    print(f"{len(layout.classes)} classes in label space {layout.label_space}{things}: {', '.join(layout.classes)}")
    print(f"train on it with: --set data.name=jaxseg_folder/{builder.builder_config.name} "
          f"--set data.data_dir={data_dir} --set data.ground_truth={layout.label_space} and the class counts "
          f"(docs/own_data.md)")


def export_scenes_folder(args: argparse.Namespace) -> int:
    counts = export_scenes(args.out_dir, args.layout, image_size=args.image_size, num_train=args.num_train,
                           num_val=args.num_val, seed=args.seed, hue_spread=args.hue_spread,
                           saturation_range=tuple(args.saturation_range) if args.saturation_range else None)
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} scenes to {args.out_dir} "
          f"({args.layout} layout)")
    return 0


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
    folder = datasets.add_parser("folder", help="your own dataset from a folder (docs/own_data.md)")
    folder.add_argument("--root", required=True, help="the folder, in the semantic or the COCO panoptic layout")
    folder.add_argument("--data_dir", "--data-dir", required=True, help="TFDS data directory")
    folder.add_argument("--name", help="dataset name, jaxseg_folder/NAME (default: the folder's name)")
    folder.add_argument("--label_space", "--label-space", choices=LABEL_SPACES, default="categories",
                        help="wsss: label 0 is the background, as PASCAL VOC (default: categories)")
    folder.add_argument("--image_labels", "--image-labels",
                        help="image-level labels file, .json or .csv (default: ROOT/image_labels.json or .csv if "
                             "there, else the classes in each image's labels)")
    folder.add_argument("--workers", type=int, help="reading processes (default: one per CPU)")
    folder.add_argument("--overwrite", action="store_true",
                        help="delete and rebuild an existing dataset of the same name")
    export = datasets.add_parser("export-scenes", help="the generated scenes as a folder, in either layout")
    export.add_argument("--out_dir", "--out-dir", "--out", required=True, help="a new or empty directory")
    export.add_argument("--layout", choices=LAYOUTS, default="semantic")
    export.add_argument("--num_train", "--num-train", type=int, default=400)
    export.add_argument("--num_val", "--num-val", type=int, default=48)
    export.add_argument("--image_size", "--image-size", type=int, default=64, help="side in pixels")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--hue_spread", "--hue-spread", type=float, help="as for `scenes`")
    export.add_argument("--saturation_range", "--saturation-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="as for `scenes`")
    return parser


def make_dataset(args: argparse.Namespace) -> int:
    commands = {"images": write_images, "scenes": build_scenes, "folder": build_folder,
                "export-scenes": export_scenes_folder}
    return commands.get(args.dataset, build_manual)(args)


def main(argv=None) -> int:
    return cli.run(parser(), make_dataset, argv)


if __name__ == "__main__":
    sys.exit(main())
