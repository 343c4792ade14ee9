"""The datasets a config can name (`DataConfig`, the config's `data` section), and opening their splits
as random-access sources.

`jaxseg_scenes` is generated (built on first use into `data_dir`, default WORKDIR/data); the official ones
are read from their downloads by a builder of `jaxseg.data.builders` into a TFDS data directory once
(`python tools/make_dataset.py voc --manual_dir DOWNLOADS --data_dir DIR`, or `data.manual_dir` in a
config), then only read; "jaxseg_folder/NAME" is your own folder, built likewise (`jaxseg-make-dataset
folder --root FOLDER --data_dir DIR --name NAME`, or `data.manual_dir=FOLDER`; `jaxseg.data.builders.folder`,
docs/own_data.md). With `pseudo_labels_dir` the training split's dense labels are the pseudo-label PNGs
written there (tools/make_pseudo_labels.py) instead of the dataset's.
"""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError

# Label spaces of a dataset's dense labels: "categories" (category ids; for weak supervision the first C
# categories are the foreground, as the scenes' things and COCO's 80 things) or "wsss" (0 background,
# c + 1 foreground class c, as VOC).
LABEL_SPACES = ("categories", "wsss")

# name -> (module, builder class) of the builders that read a manual directory.
MANUAL_BUILDERS = {
    "jaxseg_voc": ("jaxseg.data.builders.voc", "JaxsegVoc"),
    "jaxseg_ade20k": ("jaxseg.data.builders.ade20k", "JaxsegAde20k"),
    "jaxseg_cityscapes": ("jaxseg.data.builders.cityscapes", "JaxsegCityscapes"),
    "jaxseg_coco_panoptic": ("jaxseg.data.builders.coco_panoptic", "JaxsegCocoPanoptic"),
}
# A folder dataset is named "jaxseg_folder/<name>" (TFDS's dataset/config form).
FOLDER = "jaxseg_folder"


def folder_config_name(name: str) -> str | None:
    """NAME of a dataset name "jaxseg_folder/NAME"; None for the other datasets."""
    prefix, slash, config = name.partition("/")
    return config if prefix == FOLDER and slash else None


def folder_sources(name: str, data_dir: str | pathlib.Path, splits: Sequence[str], *,
                   manual_dir: str | pathlib.Path | None = None, ground_truth: str = "categories") -> dict:
    """{split: random-access source} of the folder dataset `name` ("jaxseg_folder/NAME") built in `data_dir`;
    built from the folder `manual_dir` first when given and not yet there. The dataset's label space must
    be `ground_truth`, and a `manual_dir` the folder it was built from."""
    import tensorflow_datasets as tfds

    from jaxseg.data.builders import folder

    config_name = folder_config_name(name)
    if not data_dir:
        raise UserError(f"dataset {name!r} needs data.data_dir, the TFDS data directory it is (or is to be) "
                        f"built in")
    meta = folder.metadata(data_dir, config_name)
    if meta is None:
        if not manual_dir:
            raise FileNotFoundError(
                f"dataset {name} is not built in {data_dir}: run `jaxseg-make-dataset folder --root FOLDER "
                f"--data_dir {data_dir} --name {config_name}` once, or set data.manual_dir=FOLDER")
        config = folder.FolderConfig(name=config_name, root=str(manual_dir), label_space=ground_truth)
        builder = folder.JaxsegFolder(config=config, data_dir=str(data_dir))
        with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded: keep downloads/ out of data_dir
            builder.download_and_prepare(download_dir=downloads, file_format="array_record")
        meta = folder.metadata(data_dir, config_name)
    built_from = meta["parameters"]["root"]
    if manual_dir and pathlib.Path(manual_dir).expanduser().resolve() != pathlib.Path(built_from):
        raise UserError(f"dataset {name} in {data_dir} was built from {built_from}, not data.manual_dir={manual_dir}; "
                        f"give another name, or rebuild it with `jaxseg-make-dataset folder ... --overwrite`")
    if meta["label_space"] != ground_truth:
        raise UserError(f"dataset {name} was built in label space {meta['label_space']!r} "
                        f"({'label 0 is the background' if meta['label_space'] == 'wsss' else 'every label a class'})"
                        f", but data.ground_truth={ground_truth!r}: set data.ground_truth={meta['label_space']!r}")
    builder = tfds.builder(name, data_dir=str(data_dir))
    available = sorted(builder.info.splits)
    missing = sorted(set(splits) - set(available))
    if missing:
        raise UserError(f"dataset {name} has no split(s) {missing}; valid: {available}")
    return {split: builder.as_data_source(split=split) for split in splits}


def _dataset_info(source):
    """The TFDS DatasetInfo under a source and its wrappers (pseudo-labels, subsets)."""
    while not hasattr(source, "dataset_info"):
        source = source.source
    return source.dataset_info


def manual_builder(name: str, data_dir: str | pathlib.Path, manual_dir: str | pathlib.Path | None = None,
                   **kwargs):
    """The builder of a manual-download dataset (`kwargs`: e.g. `num_workers`)."""
    if name not in MANUAL_BUILDERS:
        raise UserError(f"unknown dataset {name!r}; valid: {sorted(['jaxseg_scenes', *MANUAL_BUILDERS])}")
    module, cls = MANUAL_BUILDERS[name]
    return getattr(importlib.import_module(module), cls)(data_dir=str(data_dir), manual_dir=manual_dir, **kwargs)


def manual_sources(name: str, data_dir: str | pathlib.Path, splits: Sequence[str], *,
                   manual_dir: str | pathlib.Path | None = None) -> dict:
    """{split: random-access source} of a manual-download dataset prepared in `data_dir`; prepared from
    `manual_dir` first when given and not yet there."""
    if not data_dir:
        raise UserError(f"dataset {name!r} needs data.data_dir, the TFDS data directory it is (or is "
                        f"to be) prepared in")
    builder = manual_builder(name, data_dir, manual_dir or None)
    if not builder.is_prepared():
        if not manual_dir:
            short = name.removeprefix("jaxseg_")
            raise FileNotFoundError(
                f"dataset {name} is not prepared in {data_dir}: run `python tools/make_dataset.py {short} "
                f"--manual_dir DOWNLOADS --data_dir {data_dir}` once, or set data.manual_dir")
        builder.download_and_prepare(file_format="array_record")
    available = sorted(builder.info.splits)
    missing = sorted(set(splits) - set(available))
    if missing:
        raise UserError(f"dataset {name} has no split(s) {missing}; valid: {available}")
    return {split: builder.as_data_source(split=split) for split in splits}


def image_name(example: dict, index: int) -> str:
    """A file-name-safe name of an example: its `image_id` (VOC-style bytes or a COCO-style integer),
    else its index in the split."""
    image_id = example.get("image_id", index)
    if isinstance(image_id, bytes):
        return image_id.decode()
    return str(image_id.item() if hasattr(image_id, "item") else image_id)


class FirstExamples:
    """The first `count` examples of a source (the overlays' subset)."""

    def __init__(self, source, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.source[index]


class PseudoLabelSource:
    """A random-access source whose "semantic" maps are replaced by pseudo-label PNGs named
    `<image name>.png` (`image_name`) in `directory` (what tools/make_pseudo_labels.py writes)."""

    def __init__(self, source: Sequence[dict], directory: str | pathlib.Path):
        self.source, self.directory = source, pathlib.Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no pseudo-label directory at {self.directory}; write it with "
                                    f"tools/make_pseudo_labels.py")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[index])
        path = self.directory / f"{image_name(example, index)}.png"
        if not path.is_file():
            raise FileNotFoundError(f"pseudo-label {path} is missing for example {index}")
        example["semantic"] = np.asarray(Image.open(path))[..., None]
        return example


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A config's `data` section. `name`: "jaxseg_scenes", an official dataset (`MANUAL_BUILDERS`) or a
    folder dataset "jaxseg_folder/NAME". `image_size`, `num_train`, `num_val`, `hue_spread` and
    `saturation_range` describe a generated-scenes build (`jaxseg.data.builders.scenes`; the other datasets
    do not read them); `manual_dir` the official downloads of an official dataset, or the folder of a
    folder dataset; `ground_truth` the label space of the dense labels (`LABEL_SPACES`)."""
    name: str
    train_split: str = "train"
    data_dir: str = ""
    manual_dir: str = ""
    ground_truth: str = "categories"
    pseudo_labels_dir: str = ""
    image_size: int | None = setting(64, ">= 1")
    num_train: int | None = setting(400, ">= 1")
    num_val: int | None = setting(48, ">= 1")
    hue_spread: float | None = setting(None, "in [0, 1]")
    saturation_range: tuple[float, float] | None = setting(None, "in [0, 1]")

    def __post_init__(self):
        check_rules(self)
        if self.ground_truth not in LABEL_SPACES:
            raise UserError(f"data.ground_truth must be one of {LABEL_SPACES}, got {self.ground_truth!r}")
        valid = sorted(["jaxseg_scenes", *MANUAL_BUILDERS])
        folder = folder_config_name(self.name)
        if folder is not None:
            from jaxseg.data.builders.scenes import CONFIG_NAME

            if not CONFIG_NAME.fullmatch(folder):
                raise UserError(f"data.name={self.name!r}: the name after {FOLDER}/ must match {CONFIG_NAME.pattern}")
        elif self.name not in valid:
            raise UserError(f"unknown dataset data.name={self.name!r}; valid: {valid} or {FOLDER}/NAME (your own "
                            f"folder, docs/own_data.md)")

    def sources(self, splits: Sequence[str], workdir: str | pathlib.Path) -> dict:
        """{split: random-access source}; the training split with the pseudo-labels where configured."""
        splits = sorted(set(splits))
        if self.name == "jaxseg_scenes":
            sources = self._scenes(splits, pathlib.Path(self.data_dir or pathlib.Path(workdir) / "data"))
        elif folder_config_name(self.name) is not None:
            sources = folder_sources(self.name, self.data_dir, splits, manual_dir=self.manual_dir or None,
                                     ground_truth=self.ground_truth)
        else:
            sources = manual_sources(self.name, self.data_dir, splits, manual_dir=self.manual_dir or None)
        if self.pseudo_labels_dir and self.train_split in sources:
            sources[self.train_split] = PseudoLabelSource(sources[self.train_split], self.pseudo_labels_dir)
        return sources

    def class_names(self, label_space: str | None = None) -> list[str] | None:
        """The class names indexed by class id in `label_space` (default `ground_truth`, the space of the
        dataset's labels, which EoMT predicts); None for datasets that store no names (ADE20K, COCO
        panoptic). WeakTr and Segmenter predict in "wsss": 0 "background", then c + 1 the c-th category, of
        which only the model's C foreground classes (the first C) are ever predicted. A folder dataset's
        names are read from its build (None before it is built)."""
        if label_space is None:
            label_space = self.ground_truth
        if label_space not in LABEL_SPACES:
            raise UserError(f"label space must be one of {LABEL_SPACES}, got {label_space!r}")
        if self.name == "jaxseg_scenes":
            from jaxseg.data.synthetic import categories

            names = [category["name"] for category in categories(self._scenes_config().scene)]
        elif self.name == "jaxseg_voc":
            from jaxseg.data.builders.voc import CLASS_NAMES as names
        elif self.name == "jaxseg_cityscapes":
            from jaxseg.data.builders.cityscapes import CLASS_NAMES as names
        elif folder_config_name(self.name) is not None:
            from jaxseg.data.builders.folder import metadata

            meta = metadata(self.data_dir, folder_config_name(self.name)) if self.data_dir else None
            if meta is None:
                return None
            # Stored in the dataset's own space; a "wsss" folder names its background (label 0) too.
            names = meta["classes"][1:] if meta["label_space"] == "wsss" else meta["classes"]
        else:
            return None
        return ["background", *names] if label_space == "wsss" else list(names)

    def check_classes(self, source, *, label_space: str, num_classes: int, num_things: int | None = None,
                      things_only: bool = False, setting: str = "model.num_classes") -> None:
        """Raises a `UserError` unless a model that predicts `num_classes` classes in `label_space` (background
        included in "wsss"), `num_things` of them things (None: not a panoptic / instance model), fits the
        dataset of `source` (an opened split): in the dataset's own label space the counts must be equal
        (`things_only`, an instance model: its classes are the dataset's thing categories 0..T-1, so it has
        T of them); a "wsss" model of a "categories" dataset takes the first C categories as its foreground,
        so C must not exceed them. `setting` names what the user sets for `num_classes`. Where they disagree,
        labels beyond the model's classes would be taken for EoMT's "no object" class or dropped from the
        metrics."""
        info = _dataset_info(source)
        count = info.features["labels"].shape[0] + (self.ground_truth == "wsss")  # "wsss" labels skip background
        space = f"label space {self.ground_truth!r}" + (", background included" if self.ground_truth == "wsss" else "")
        if label_space == self.ground_truth and not things_only and num_classes != count:
            raise UserError(f"{setting}: the model predicts {num_classes} classes, dataset {self.name} has {count} "
                            f"({space}); they must agree")
        if label_space == "wsss" and self.ground_truth == "categories" and not 1 <= num_classes - 1 <= count:
            raise UserError(f"{setting}: the model's {num_classes - 1} foreground classes (the first categories of the "
                            f"dataset, background added) must be 1 to the {count} categories of dataset {self.name}")
        if label_space == "categories" and self.ground_truth == "wsss":
            raise UserError(f"dataset {self.name} holds labels in label space 'wsss'; this model predicts "
                            f"'categories'")
        categories = info.metadata.get("categories") if info.metadata else None
        things = sum(bool(c["isthing"]) for c in categories) if categories else None
        if things_only and (num_classes > count or things is not None and num_classes != things):
            raise UserError(f"{setting}: an instance model's classes are the dataset's thing categories; the model "
                            f"predicts {num_classes}, dataset {self.name} has {things} thing categories of {count}")
        if num_things is not None and things is not None and num_things != things:
            raise UserError(f"method.num_things={num_things}, but dataset {self.name} has {things} thing categories "
                            f"(its categories 0..{things - 1}); they must agree")

    def _scenes_config(self):
        from jaxseg.data.builders.scenes import scenes_config

        return scenes_config(image_size=self.image_size, num_train=self.num_train, num_val=self.num_val,
                             hue_spread=self.hue_spread, saturation_range=self.saturation_range)

    def _scenes(self, splits: Sequence[str], data_dir: pathlib.Path) -> dict:
        import tensorflow_datasets as tfds

        from jaxseg.data.builders.scenes import JaxsegScenes

        config = self._scenes_config()
        JaxsegScenes(config=config, data_dir=data_dir).download_and_prepare(file_format="array_record")
        valid = ("train", "validation")
        unknown = sorted(set(splits) - set(valid))
        if unknown:
            raise UserError(f"dataset jaxseg_scenes has no split(s) {unknown}; valid: {list(valid)}")
        return {split: tfds.data_source(f"jaxseg_scenes/{config.name}", data_dir=data_dir, split=split)
                for split in splits}
