"""The datasets a config can name (`DataConfig`, the config's `data` section), and opening their splits
as random-access sources.

`jaxseg_scenes` is generated (built on first use into `data_dir`, default WORKDIR/data); the others are
read from their official downloads by a builder of `jaxseg.data.builders` into a TFDS data directory once
(`python tools/make_dataset.py voc --manual_dir DOWNLOADS --data_dir DIR`, or `data.manual_dir` in a
config), then only read. With `pseudo_labels_dir` the training split's dense labels are the pseudo-label
PNGs written there (tools/make_pseudo_labels.py) instead of the dataset's.
"""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

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


def manual_builder(name: str, data_dir: str | pathlib.Path, manual_dir: str | pathlib.Path | None = None,
                   **kwargs):
    """The builder of a manual-download dataset (`kwargs`: e.g. `num_workers`)."""
    if name not in MANUAL_BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(['jaxseg_scenes', *MANUAL_BUILDERS])}")
    module, cls = MANUAL_BUILDERS[name]
    return getattr(importlib.import_module(module), cls)(data_dir=str(data_dir), manual_dir=manual_dir, **kwargs)


def manual_sources(name: str, data_dir: str | pathlib.Path, splits: Sequence[str], *,
                   manual_dir: str | pathlib.Path | None = None) -> dict:
    """{split: random-access source} of a manual-download dataset prepared in `data_dir`; prepared from
    `manual_dir` first when given and not yet there."""
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs data.data_dir, the TFDS data directory it is (or is "
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
        raise ValueError(f"dataset {name} has no split(s) {missing}; valid: {available}")
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
    """A config's `data` section. `image_size`, `num_train`, `num_val`, `hue_spread` and
    `saturation_range` describe a generated-scenes build (`jaxseg.data.builders.scenes`); `manual_dir`
    the official downloads of the other datasets; `ground_truth` the label space of the dense labels
    (`LABEL_SPACES`)."""
    name: str
    train_split: str = "train"
    data_dir: str = ""
    manual_dir: str = ""
    ground_truth: str = "categories"
    pseudo_labels_dir: str = ""
    image_size: int = 64
    num_train: int = 400
    num_val: int = 48
    hue_spread: float | None = None
    saturation_range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.ground_truth not in LABEL_SPACES:
            raise ValueError(f"data.ground_truth must be one of {LABEL_SPACES}, got {self.ground_truth!r}")
        valid = sorted(["jaxseg_scenes", *MANUAL_BUILDERS])
        if self.name not in valid:
            raise ValueError(f"unknown dataset data.name={self.name!r}; valid: {valid}")

    def sources(self, splits: Sequence[str], workdir: str | pathlib.Path) -> dict:
        """{split: random-access source}; the training split with the pseudo-labels where configured."""
        splits = sorted(set(splits))
        if self.name == "jaxseg_scenes":
            sources = self._scenes(splits, pathlib.Path(self.data_dir or pathlib.Path(workdir) / "data"))
        else:
            sources = manual_sources(self.name, self.data_dir, splits, manual_dir=self.manual_dir or None)
        if self.pseudo_labels_dir and self.train_split in sources:
            sources[self.train_split] = PseudoLabelSource(sources[self.train_split], self.pseudo_labels_dir)
        return sources

    def _scenes(self, splits: Sequence[str], data_dir: pathlib.Path) -> dict:
        import tensorflow_datasets as tfds

        from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config

        config = scenes_config(image_size=self.image_size, num_train=self.num_train, num_val=self.num_val,
                               hue_spread=self.hue_spread, saturation_range=self.saturation_range)
        JaxsegScenes(config=config, data_dir=data_dir).download_and_prepare(file_format="array_record")
        valid = ("train", "validation")
        unknown = sorted(set(splits) - set(valid))
        if unknown:
            raise ValueError(f"dataset jaxseg_scenes has no split(s) {unknown}; valid: {list(valid)}")
        return {split: tfds.data_source(f"jaxseg_scenes/{config.name}", data_dir=data_dir, split=split)
                for split in splits}
