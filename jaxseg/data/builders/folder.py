"""`jaxseg_folder/<name>`: your own dataset, read from a folder in one of two layouts, checked, and built
once into TFDS ArrayRecord like the official datasets (`jaxseg-make-dataset folder --root ROOT
--data_dir DIR --name NAME`; a config reads it as `data.name="jaxseg_folder/NAME"`, docs/own_data.md).

Layouts (ROOT: the folder; <split>: one folder per split. "val" and "validation" become the split
"validation", "training" becomes "train", a year suffix as COCO's "train2017" is dropped, other names are
kept; every name in the layout is matched exactly, case included):

  semantic
    ROOT/classes.txt               one class name per line, line i names label value i (or classes.json:
                                   a JSON list of names)
    ROOT/images/<split>/<stem>.jpg|.jpeg|.png|.bmp|.webp     (or img_dir/, as mmsegmentation)
    ROOT/labels/<split>/<stem>.png (or annotations/, as ADE20K, or ann_dir/, as mmsegmentation): an 8-bit
                                   greyscale or palette PNG whose values (a palette's indices) are the
                                   labels, 255 = ignore; paired with the image of the same stem
  coco_panoptic
    ROOT/panoptic_<split>.json and ROOT/panoptic_<split>/<file_name>.png (or both in ROOT/annotations/,
                                   as COCO): COCO's panoptic format, categories with "isthing"
    ROOT/images/<split>/<file_name> (or ROOT/<split>/, as COCO's train2017/)
    The categories are renumbered contiguously, things first (`coco_panoptic.category_table`), so that
    categories 0..T-1 are the things, as `method.num_things` counts them.

Image-level labels (WSSS): ROOT/image_labels.json, {"<stem>": [class, ...]}, or ROOT/image_labels.csv,
rows "<stem>,<class>[,<class>...]" (a cell may hold several classes separated by ";"; a first row
starting with "image" is a header), or any such file given as `image_labels`. A class is its name or its
id (a label value; in coco_panoptic, the json's category id). An image that the file does not list takes
the classes present in its labels (panoptic: its segments, crowd included). In the semantic layout a split
without a labels folder holds images only (e.g. the training split of weakly supervised learning): the
file must list each of them, and their dense labels are all 255 (ignored).

Label spaces (`label_space`, matched by the config's `data.ground_truth`): "categories" (default): every
label value is a class; "wsss" (semantic layout): label 0 is the background, as PASCAL VOC, and the
image-level labels are the classes 1..K-1 (class c at index c - 1).

Everything is checked before anything is written, reading every file (in `num_workers` processes): a
missing pair, an image whose size differs from its labels', an unreadable or 16-bit image, a label value
beyond the classes, a segment id without its entry, a bad classes or image-labels file each raise one
`UserError` that names the file and the rule.

Features of one example (H, W: the image's size; K classes, L = K, or K - 1 in "wsss"):
  image:     (H, W, 3) uint8, PNG.
  semantic:  (H, W, 1) uint8 labels, 255 = ignore, PNG (coco_panoptic: each non-crowd segment's category).
  labels:    (L,) uint8 multi-hot image-level labels.
  image_id:  bytes, the image's file stem.
  coco_panoptic also: panoptic (H, W) int32 segment ids and segments, as `coco_panoptic`.
Splits: the split folders, each sorted by stem. Metadata (`metadata.json` beside the records):
"parameters" (`FolderConfig.parameters`), "layout", "label_space", "classes" (names by label value or
contiguous category), "num_things" (coco_panoptic; else null) and "categories" (coco_panoptic: as
`coco_panoptic`'s, "coco_id" the json's id).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxseg.data.builders.coco_panoptic import (
    category_table,
    panoptic_example,
    panoptic_features,
    panoptic_ids,
    segment_table,
)
from jaxseg.data.builders.manual import (
    JaxsegBuilder,
    multi_hot,
    read_label,
    semantic_example,
    semantic_features,
)
from jaxseg.data.builders.scenes import CONFIG_NAME, VALIDATION_OFFSET, scenes_config
from jaxseg.data.datasets import LABEL_SPACES
from jaxseg.data.synthetic import categories as scene_categories
from jaxseg.data.synthetic import generate_scene
from jaxseg.errors import UserError

LAYOUTS = ("semantic", "coco_panoptic")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGE_FOLDERS = ("images", "img_dir")
LABEL_FOLDERS = ("labels", "annotations", "ann_dir")
CLASS_FILES = ("classes.txt", "classes.json")
IMAGE_LABEL_FILES = ("image_labels.json", "image_labels.csv")
SPLIT_ALIASES = {"training": "train", "val": "validation"}
IGNORE = 255
# PIL modes read as 8-bit colour; 16-bit and float images would lose their range in a conversion.
_IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")
_CSV_HEADER = "image"


def split_name(folder: str) -> str:
    """The split a folder holds: aliases and a year suffix resolved (module docstring)."""
    name = re.sub(r"(?<=[a-z])\d{4}$", "", folder)
    return SPLIT_ALIASES.get(name, name)


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """A folder dataset: its `root`, `label_space` and image-level labels file (`image_labels`; "": ROOT's
    image_labels.json / .csv if there, else the classes present in the labels)."""
    root: str = ""
    label_space: str = "categories"
    image_labels: str = ""

    def __post_init__(self):
        if not CONFIG_NAME.fullmatch(self.name):
            raise UserError(f"dataset name must match {CONFIG_NAME.pattern}, got {self.name!r}")
        if self.label_space not in LABEL_SPACES:
            raise UserError(f"label space must be one of {LABEL_SPACES}, got {self.label_space!r}")
        if not self.root:
            raise UserError("a folder dataset needs the folder it is read from (root)")

    def parameters(self) -> dict:
        """What determines the examples besides the files, in the form metadata.json stores."""
        return {"root": str(pathlib.Path(self.root).expanduser().resolve()), "label_space": self.label_space,
                "image_labels": str(pathlib.Path(self.image_labels).expanduser().resolve())
                if self.image_labels else ""}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A folder's contents after the checks that need no decoding: `splits` {split: [(stem, item)]} sorted by
    stem, the items being what the layout's `_CHECKS` and `_EXAMPLES` functions read."""
    kind: str
    label_space: str
    classes: tuple[str, ...]
    num_labels: int
    splits: dict
    categories: tuple[dict, ...] | None = None

    @property
    def num_things(self) -> int | None:
        return None if self.categories is None else sum(c["isthing"] for c in self.categories)


def _files(folder: pathlib.Path, suffixes: tuple[str, ...], what: str) -> dict[str, pathlib.Path]:
    """{stem: file} of the files of `folder` with `suffixes` (other files are skipped, except in a labels
    folder, whose files must all be PNGs); a subfolder or a repeated stem is an error."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            raise UserError(f"{path} is a folder inside the {what} folder {folder}: nested folders are not read, "
                            f"put the files directly in {folder}")
        if path.suffix.lower() not in suffixes:
            if what == "labels":
                raise UserError(f"{path} is not a PNG: labels must be PNG label maps (JPEG would alter the values)")
            continue
        if path.stem in found:
            raise UserError(f"{path} and {found[path.stem]} have the same stem: each {what[:-1]} needs its own")
        found[path.stem] = path
    return found


def _one_folder(root: pathlib.Path, names: tuple[str, ...], what: str) -> pathlib.Path | None:
    present = [root / name for name in names if (root / name).is_dir()]
    if len(present) > 1:
        raise UserError(f"{root} has both {present[0].name}/ and {present[1].name}/ for the {what}; keep one")
    return present[0] if present else None


def _split_folders(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """{split: its folder} of the split folders in `folder`."""
    splits = {}
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = split_name(path.name)
        if not re.fullmatch(r"\w+", name):
            raise UserError(f"split folder {path}: a split name must be letters, digits and _")
        if name in splits:
            raise UserError(f"{splits[name]} and {path} are both the split {name!r}; keep one")
        splits[name] = path
    if not splits:
        raise UserError(f"{folder} holds no split folders: put the files in e.g. {folder}/train and {folder}/val")
    return splits


def read_classes(root: pathlib.Path) -> tuple[pathlib.Path, tuple[str, ...]]:
    """The class names of a semantic folder, by label value, and the file they come from."""
    present = [root / name for name in CLASS_FILES if (root / name).is_file()]
    if not present:
        raise UserError(f"{root} has no classes.txt (one class name per line, line i naming label value i) "
                        f"or classes.json (a JSON list of names)")
    if len(present) > 1:
        raise UserError(f"{root} has both classes.txt and classes.json; keep one")
    path = present[0]
    if path.suffix == ".json":
        try:
            names = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"classes file {path} is not valid JSON: {e}") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"classes file {path} must hold a JSON list of class names (strings)")
        names = [n.strip() for n in names]
    else:
        names = path.read_text().rstrip("\n").split("\n")
        names = [n.strip() for n in names]
    empty = [i for i, n in enumerate(names) if not n]
    if not names or empty:
        raise UserError(f"classes file {path}: class {empty[0] if empty else 0} has no name; give one name per "
                        f"label value 0, 1, ... without gaps")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"classes file {path} names {repeated} more than once; class names must be unique")
    if len(names) > IGNORE:
        raise UserError(f"classes file {path} names {len(names)} classes; at most {IGNORE} fit 8-bit labels "
                        f"({IGNORE} = ignore)")
    return path, tuple(names)


def _image_labels_file(root: pathlib.Path, given: str) -> pathlib.Path | None:
    if given:
        path = pathlib.Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"image-level labels file {path} does not exist")
        if path.suffix not in (".json", ".csv"):
            raise UserError(f"image-level labels file {path} must be .json or .csv")
        return path
    present = [root / name for name in IMAGE_LABEL_FILES if (root / name).is_file()]
    if len(present) > 1:
        raise UserError(f"{root} has both image_labels.json and image_labels.csv; keep one")
    return present[0] if present else None


def read_image_labels(path: pathlib.Path, lookup: dict, num_labels: int, background: str | None = None
                      ) -> dict[str, np.ndarray]:
    """{stem: (num_labels,) uint8 multi-hot} of an image-level labels file (module docstring); `lookup`
    maps each accepted class (name or id) to its index in the labels, `background` names the label that
    is no image-level class (wsss)."""
    if path.suffix == ".json":
        try:
            table = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"image-level labels file {path} is not valid JSON: {e}") from e
        if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
            raise UserError(f"image-level labels file {path} must hold a JSON object {{image stem: [classes]}}")
        rows = list(table.items())
    else:
        with path.open(newline="") as f:
            rows = [(r[0].strip(), [c.strip() for cell in r[1:] for c in cell.split(";") if c.strip()])
                    for r in csv.reader(f) if r and r[0].strip()]
        if rows and rows[0][0].lower() == _CSV_HEADER:
            rows = rows[1:]
    out = {}
    for stem, classes in rows:
        stem = pathlib.Path(stem).stem if pathlib.Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
        if stem in out:
            raise UserError(f"image-level labels file {path} lists {stem!r} twice")
        labels = np.zeros(num_labels, np.uint8)
        for entry in classes:
            if not isinstance(entry, (str, int)) or isinstance(entry, bool):
                raise UserError(f"image-level labels file {path}: {stem!r} lists {entry!r}; give class names or ids")
            key = entry if entry in lookup else _as_id(entry)
            if key not in lookup:
                rule = (f"{background!r} (label 0) is the background, no image-level class" if
                        background is not None and key in (0, background) else
                        f"give one of the class names or {_valid_keys(lookup)}")
                raise UserError(f"image-level labels file {path}: {stem!r} lists class {entry!r}; {rule}")
            labels[lookup[key]] = 1
        out[stem] = labels
    return out


def _as_id(entry):
    if isinstance(entry, str) and re.fullmatch(r"\d+", entry):
        return int(entry)
    return entry


def _valid_keys(lookup: dict) -> str:
    ids = sorted(k for k in lookup if isinstance(k, int))
    return f"ids {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else f"ids {ids}"


def _attach_image_labels(splits: dict, given: dict[str, np.ndarray], path: pathlib.Path | None) -> dict:
    """Each item with the image-level labels the file gives its stem (None: from the dense labels). A listed
    stem must be an image of exactly one split; an image without dense labels must be listed."""
    where = {}
    for items in splits.values():
        for stem, item in items:
            where.setdefault(stem, []).append(item["image"])
    for stem in given:
        if stem not in where:
            raise UserError(f"image-level labels file {path} lists {stem!r}, which is no image of any split")
        if len(where[stem]) > 1:
            raise UserError(f"image-level labels file {path} lists {stem!r}, the stem of several images "
                            f"{[str(p) for p in where[stem]]}: rename them apart")
    for items in splits.values():
        for stem, item in items:
            item["labels"] = given.get(stem)
            if item["labels"] is None and not item["dense"]:
                raise UserError(f"{item['image']} has no labels: neither a label map {item['expected']} nor an "
                                f"entry in an image-level labels file ({' or '.join(IMAGE_LABEL_FILES)} in the folder)")
    return splits


# ---------------------------------------------------------------------------------------------------
# The semantic layout.

def _semantic_layout(root: pathlib.Path, label_space: str, image_labels: str) -> Layout:
    classes_path, classes = read_classes(root)
    if label_space == "wsss" and len(classes) < 2:
        raise UserError(f"classes file {classes_path}: label space wsss needs the background (label 0) and at "
                        f"least one class")
    image_root = _one_folder(root, IMAGE_FOLDERS, "images")
    label_root = _one_folder(root, LABEL_FOLDERS, "labels")
    if image_root is None:
        raise UserError(f"{root} has no images/ folder (or img_dir/) with a folder per split")
    image_splits = _split_folders(image_root)
    label_splits = _split_folders(label_root) if label_root is not None else {}
    for split, folder in label_splits.items():
        if split not in image_splits:
            raise UserError(f"labels folder {folder} has no images folder of its split in {image_root}")
    splits = {}
    for split, folder in image_splits.items():
        images = _files(folder, IMAGE_SUFFIXES, "images")
        if not images:
            raise UserError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        labels = _files(label_splits[split], (".png",), "labels") if split in label_splits else None
        if labels is not None:
            for stem, image in images.items():
                if stem not in labels:
                    raise UserError(f"{image} has no label map: expected {label_splits[split] / stem}.png "
                                    f"(images and labels are paired by file stem)")
            for stem, label in labels.items():
                if stem not in images:
                    raise UserError(f"{label} has no image: expected {folder / stem} with one of "
                                    f"{'/'.join(IMAGE_SUFFIXES)} (images and labels are paired by file stem)")
        expected = (label_root or root / LABEL_FOLDERS[0]) / folder.name
        splits[split] = [(stem, {"stem": stem, "image": images[stem], "dense": labels is not None,
                                 "label": labels[stem] if labels is not None else None,
                                 "expected": expected / f"{stem}.png"})
                         for stem in sorted(images)]
    num_labels = len(classes) - (label_space == "wsss")
    lookup = {}
    for value, name in enumerate(classes):
        if label_space == "wsss" and value == 0:
            continue
        lookup[name] = lookup[value] = value - (label_space == "wsss")
    labels_path = _image_labels_file(root, image_labels)
    given = read_image_labels(labels_path, lookup, num_labels,
                              classes[0] if label_space == "wsss" else None) if labels_path else {}
    splits = _attach_image_labels(splits, given, labels_path)
    for items in splits.values():
        for _, item in items:
            item.update(num_classes=len(classes), classes_file=str(classes_path), label_space=label_space)
    return Layout("semantic", label_space, classes, num_labels, splits)


def _read_rgb(path: pathlib.Path) -> Image.Image:
    """The decoded image at `path`, 8-bit colour (module docstring)."""
    try:
        image = Image.open(path)
        image.load()
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise UserError(f"cannot read image {path}: {e}") from e
    if image.mode not in _IMAGE_MODES:
        raise UserError(f"image {path} has PIL mode {image.mode} (16-bit or float pixels): give 8-bit images")
    return image


def _label_map(path: pathlib.Path) -> np.ndarray:
    try:
        return read_label(path)
    except OSError as e:
        raise UserError(f"cannot read label map {path}: {e}") from e


def _check_semantic(item: dict) -> None:
    with _read_rgb(item["image"]) as image:
        size = (image.height, image.width)
    if item["label"] is None:
        return
    label = _label_map(item["label"])
    if label.shape != size:
        raise UserError(f"{item['label']} is {label.shape[0]}x{label.shape[1]} (HxW) but its image {item['image']} "
                        f"is {size[0]}x{size[1]}: a label map must have its image's size")
    values = np.unique(label)
    beyond = values[(values >= item["num_classes"]) & (values != IGNORE)]
    if beyond.size:
        raise UserError(f"{item['label']} holds label {int(beyond[0])}, beyond the {item['num_classes']} classes of "
                        f"{item['classes_file']} (values 0..{item['num_classes'] - 1}, {IGNORE} = ignore)")


def _semantic_example(item: dict) -> dict:
    if item["label"] is None:
        with _read_rgb(item["image"]) as image:
            semantic = np.full((image.height, image.width), IGNORE, np.uint8)
    else:
        semantic = _label_map(item["label"])
    labels = item["labels"]
    if labels is None:
        present = multi_hot(semantic, item["num_classes"])
        labels = present[1:] if item["label_space"] == "wsss" else present
    return semantic_example(item["image"], semantic, labels, item["stem"])


# ---------------------------------------------------------------------------------------------------
# The COCO panoptic layout.

def _panoptic_jsons(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """{split: panoptic json} in ROOT or ROOT/annotations/."""
    found = {}
    for folder in (root, root / "annotations"):
        for path in sorted(folder.glob("panoptic_*.json")) if folder.is_dir() else []:
            split = split_name(path.stem.removeprefix("panoptic_"))
            if split in found:
                raise UserError(f"{found[split]} and {path} both annotate the split {split!r}; keep one")
            found[split] = path
    return found


def _read_json(path: pathlib.Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    missing = [key for key in ("images", "annotations", "categories") if key not in document]
    if missing:
        raise UserError(f"{path} lacks {missing}: a COCO panoptic json has 'images', 'annotations' and 'categories'")
    return document


def _image_folder(root: pathlib.Path, json_path: pathlib.Path) -> pathlib.Path:
    folder = json_path.stem.removeprefix("panoptic_")
    candidates = [root / "images" / folder, root / folder]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError(f"no image folder for {json_path}: expected {candidates[0]} or {candidates[1]}")


def _panoptic_layout(root: pathlib.Path, label_space: str, image_labels: str, jsons: dict) -> Layout:
    if label_space != "categories":
        raise UserError(f"{root} is a COCO panoptic folder: its label space is 'categories' (the json's "
                        f"categories, things first), not {label_space!r}")
    table, first = None, None
    splits = {}
    for split, json_path in jsons.items():
        document = _read_json(json_path)
        categories = category_table(document["categories"], json_path)
        if table is None:
            table, first = categories, json_path
        elif categories != table:
            raise UserError(f"{json_path} has other categories than {first}; every split needs the same")
        by_id = {c["coco_id"]: c for c in table}
        image_folder = _image_folder(root, json_path)
        png_folder = json_path.parent / json_path.stem
        if not png_folder.is_dir():
            raise UserError(f"no folder {png_folder} of the PNGs of {json_path}")
        files = {image.get("id"): image.get("file_name") for image in document["images"]}
        items = {}
        for a in document["annotations"]:
            if not all(key in a for key in ("image_id", "file_name", "segments_info")):
                raise UserError(f"{json_path}: annotation {a.get('file_name', a.get('image_id'))!r} needs "
                                f"'image_id', 'file_name' and 'segments_info'")
            if files.get(a["image_id"]) is None:
                raise UserError(f"{json_path}: annotation {a['file_name']} has image_id {a['image_id']!r}, which "
                                f"no entry of 'images' (with a 'file_name') has")
            image, png = image_folder / files[a["image_id"]], png_folder / a["file_name"]
            for path, what in ((image, "image"), (png, "panoptic PNG")):
                if not path.is_file():
                    raise UserError(f"{json_path}: the {what} {path} of image_id {a['image_id']!r} does not exist")
            stem = image.stem
            if stem in items:
                raise UserError(f"{json_path}: images {items[stem]['image']} and {image} have the same stem")
            segments = segment_table(a["segments_info"], by_id, f"{json_path}, {a['file_name']}")
            items[stem] = {"stem": stem, "image": image, "png": png, "segments": segments, "dense": True,
                           "json": str(json_path), "num_classes": len(table)}
        if not items:
            raise UserError(f"{json_path} annotates no images")
        splits[split] = [(stem, items[stem]) for stem in sorted(items)]
    lookup = {}
    for c in table:
        lookup[c["name"]] = lookup[c["coco_id"]] = c["id"]
    labels_path = _image_labels_file(root, image_labels)
    given = read_image_labels(labels_path, lookup, len(table)) if labels_path else {}
    splits = _attach_image_labels(splits, given, labels_path)
    return Layout("coco_panoptic", label_space, tuple(c["name"] for c in table), len(table), splits, tuple(table))


def _check_panoptic(item: dict) -> None:
    with _read_rgb(item["image"]) as image:
        size = (image.height, image.width)
    with _read_rgb(item["png"]) as png:
        if png.mode not in ("RGB", "RGBA"):
            raise UserError(f"panoptic PNG {item['png']} has PIL mode {png.mode}: COCO's format is RGB, segment "
                            f"id = R + 256 G + 256^2 B")
    ids = panoptic_ids(item["png"])
    if ids.shape != size:
        raise UserError(f"{item['png']} is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image {item['image']} is "
                        f"{size[0]}x{size[1]}: a panoptic PNG must have its image's size")
    unknown = np.setdiff1d(np.unique(ids), np.concatenate([[0], item["segments"]["id"]]))
    if unknown.size:
        raise UserError(f"{item['png']} holds segment id {int(unknown[0])}, which {item['json']} does not list in "
                        f"its segments_info (every nonzero id needs its segment, 0 = void)")


def _panoptic_example(item: dict) -> dict:
    segments = item["segments"]
    labels = item["labels"]
    if labels is None:
        labels = multi_hot(segments["category_id"], item["num_classes"])
    return panoptic_example(item["stem"], item["image"], panoptic_ids(item["png"]), segments, labels)


_CHECKS = {"semantic": _check_semantic, "coco_panoptic": _check_panoptic}
_EXAMPLES = {"semantic": _semantic_example, "coco_panoptic": _panoptic_example}


def read_layout(root, label_space: str = "categories", image_labels: str = "") -> Layout:
    """The layout of the folder `root` (module docstring) with every check that needs no decoding done."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    jsons = _panoptic_jsons(root)
    if jsons:
        label_folder = _one_folder(root, ("labels", "ann_dir"), "labels")
        if label_folder is not None:
            raise UserError(f"{root} holds both COCO panoptic jsons ({jsons[next(iter(jsons))].name}) and a "
                            f"semantic labels folder {label_folder.name}/: give one layout per folder")
        return _panoptic_layout(root, label_space, image_labels, jsons)
    if _one_folder(root, IMAGE_FOLDERS, "images") is None:
        raise UserError(f"{root} is in neither layout: expected images/<split>/ with labels/<split>/ and "
                        f"classes.txt (semantic), or panoptic_<split>.json with panoptic_<split>/ (COCO panoptic)")
    return _semantic_layout(root, label_space, image_labels)


class JaxsegFolder(JaxsegBuilder):
    """A dataset read from a folder (module docstring); `config` a `FolderConfig`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    @functools.cached_property
    def layout(self) -> Layout:
        config: FolderConfig = self.builder_config
        return read_layout(config.root, config.label_space, config.image_labels)

    def _info(self) -> tfds.core.DatasetInfo:
        layout = self.layout
        if layout.kind == "semantic":
            features = semantic_features(layout.num_labels)
        else:
            features = panoptic_features(layout.num_labels, tfds.features.Text())
        metadata = tfds.core.MetadataDict(
            parameters=self.builder_config.parameters(), layout=layout.kind, label_space=layout.label_space,
            classes=list(layout.classes), num_things=layout.num_things,
            categories=list(layout.categories) if layout.categories else None)
        return self.dataset_info_from_configs(
            description=f"{layout.kind} folder {self.builder_config.root}",
            features=tfds.features.FeaturesDict(features), metadata=metadata,
            disable_shuffling=True)  # examples in stem order

    def check(self) -> None:
        """Reads every file of the folder and raises the first `UserError` (module docstring)."""
        items = [item for split in self.layout.splits.values() for _, item in split]
        for _ in self._map(_CHECKS[self.layout.kind], items):
            pass

    def download_and_prepare(self, **kwargs) -> None:
        # Checked here, before TFDS creates any folder, so that a bad folder leaves the data_dir untouched.
        if not self.is_prepared():
            self.check()
        super().download_and_prepare(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(items) for split, items in self.layout.splits.items()}

    def _generate_examples(self, items: list):
        make = _EXAMPLES[self.layout.kind]
        yield from zip([stem for stem, _ in items], self._map(make, [item for _, item in items]))


def metadata(data_dir, name: str) -> dict | None:
    """The metadata of the folder dataset `name` built in `data_dir`; None if it is not there."""
    path = pathlib.Path(data_dir).expanduser() / "jaxseg_folder" / name / str(JaxsegFolder.VERSION) / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# The generated scenes as a folder.

def export_scenes(out_dir, layout: str = "semantic", *, image_size: int = 64, num_train: int = 400,
                  num_val: int = 48, seed: int = 0, hue_spread: float | None = None,
                  saturation_range: tuple[float, float] | None = None) -> dict[str, int]:
    """Writes the generated scenes of `scenes_config(...)` (the examples of the `jaxseg_scenes` dataset of
    the same values, scene for scene) into the new or empty folder `out_dir` in `layout`: "semantic"
    (palette label PNGs, classes.txt) or "coco_panoptic" (json ids = contiguous id + 1). Splits "train" and
    "val"; returns {split folder: image count}."""
    from jaxseg.visualize import label_png, panoptic_png

    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty directory")
    config = scenes_config(image_size=image_size, num_train=num_train, num_val=num_val, seed=seed,
                           hue_spread=hue_spread, saturation_range=saturation_range)
    table = scene_categories(config.scene)
    out_dir.mkdir(parents=True, exist_ok=True)
    if layout == "semantic":
        (out_dir / "classes.txt").write_text("".join(f"{c['name']}\n" for c in table))
    counts = {}
    for folder, first, count in (("train", 0, config.num_train), ("val", VALIDATION_OFFSET, config.num_val)):
        (out_dir / "images" / folder).mkdir(parents=True)
        annotation_dir = out_dir / "labels" / folder if layout == "semantic" else out_dir / f"panoptic_{folder}"
        annotation_dir.mkdir(parents=True)
        images, annotations = [], []
        for position in range(count):
            scene = generate_scene(config.scene, first + position)
            name = f"scene_{position:06d}.png"
            Image.fromarray(scene["image"]).save(out_dir / "images" / folder / name)
            if layout == "semantic":
                label_png(scene["semantic"]).save(annotation_dir / name)
                continue
            panoptic_png(scene["panoptic"]).save(annotation_dir / name)
            segments = scene["segments"]
            images.append({"id": position, "file_name": name, "height": image_size, "width": image_size})
            annotations.append({"image_id": position, "file_name": name, "segments_info": [
                {"id": int(segments["id"][k]), "category_id": int(segments["category_id"][k]) + 1,
                 "iscrowd": int(segments["iscrowd"][k]), "area": int(segments["area"][k]),
                 "bbox": [int(v) for v in segments["bbox"][k]]} for k in range(len(segments["id"]))]})
        if layout == "coco_panoptic":
            categories = [{"id": c["id"] + 1, "name": c["name"], "isthing": int(c["isthing"])} for c in table]
            (out_dir / f"panoptic_{folder}.json").write_text(json.dumps(
                {"images": images, "annotations": annotations, "categories": categories}))
        counts[folder] = count
    return counts
