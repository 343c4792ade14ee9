"""The datasets a config can name, and opening a prepared one as random-access sources.

`jaxseg_scenes` is generated (built on first use by `jaxseg.train.run`); the others are read from their
official downloads by a builder of `jaxseg.data.builders` into a TFDS data directory once
(`python tools/make_dataset.py voc --manual_dir DOWNLOADS --data_dir DIR`, or `dataset.manual_dir` in
a config), then only read.
"""
from __future__ import annotations

import importlib
import pathlib
from collections.abc import Sequence

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
        raise ValueError(f"dataset {name!r} needs dataset.data_dir, the TFDS data directory it is (or is "
                         f"to be) prepared in")
    builder = manual_builder(name, data_dir, manual_dir or None)
    if not builder.is_prepared():
        if not manual_dir:
            short = name.removeprefix("jaxseg_")
            raise FileNotFoundError(
                f"dataset {name} is not prepared in {data_dir}: run `python tools/make_dataset.py {short} "
                f"--manual_dir DOWNLOADS --data_dir {data_dir}` once, or set dataset.manual_dir")
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
