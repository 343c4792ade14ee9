"""Pieces shared by jaxseg's TFDS builders: the base classes, PNG encoding, ordered multi-process example
generation, and, for the builders of official datasets (`voc`, `ade20k`, `cityscapes`, `coco_panoptic`),
the manual directory that holds their downloads and the features they have in common.

Those builders download nothing: the official archives are fetched by hand and extracted into one
"manual" directory per dataset (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS gives the layout). Build
(no TensorFlow needed), e.g.:

    builder = JaxsegVoc(manual_dir="~/data/voc", data_dir=DIR, num_workers=8)
    builder.download_and_prepare(file_format="array_record")
    train = tfds.data_source("jaxseg_voc", data_dir=DIR, split="train_aug")

The manual directory is `manual_dir=` of the constructor, else TFDS's own
`download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`, else TFDS's default
`<download_dir>/manual` (`<data_dir>/downloads/manual`). Every input file is checked before the first
example is written: a missing one raises a `FileNotFoundError` that names the path it was expected at
and the official download it comes from.
"""
from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import inspect
import io
import logging
import multiprocessing
import os
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxseg.errors import UserError

log = logging.getLogger(__name__)

# Examples generated per round by the worker processes: bounds the finished examples held in memory.
_BLOCK = 512


def png(array: np.ndarray) -> bytes:
    # Encoded here with PIL: TFDS would encode numpy arrays with TensorFlow.
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scalar(dtype) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(), dtype=dtype)


def segments_feature() -> tfds.features.Sequence:
    """The segment table of a panoptic example: per-segment "id", "category_id", "is_thing", "iscrowd",
    "area" and COCO "bbox" [x, y, width, height]."""
    return tfds.features.Sequence({
        "id": scalar(np.int32), "category_id": scalar(np.int32),
        "is_thing": scalar(np.bool_), "iscrowd": scalar(np.bool_),
        "area": scalar(np.int32), "bbox": tfds.features.Tensor(shape=(4,), dtype=np.int32)})


class JaxsegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose examples are made by a picklable function in `num_workers` processes."""

    # TFDS 4.9.10 finds a builder's source through the `importlib_resources` backport, which it only
    # declares for Python < 3.9 (tensorflow/datasets#11212): point it at the subclass's file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        """`num_workers`: processes generating examples (default: one per CPU; 1: this process only).
        Other arguments: those of `tfds.core.GeneratorBasedBuilder` (`config`, `data_dir`, ...)."""
        if num_workers is not None and num_workers < 1:
            raise UserError(f"num_workers must be >= 1, got {num_workers!r}")
        self._num_workers = num_workers or os.cpu_count() or 1
        super().__init__(**kwargs)

    # TFDS prints (not logs) its notes, with sizes a generated dataset does not know ("Unknown size"):
    # one line through logging instead, which the tools show and a library user can silence.
    def _log_download_bytes(self) -> None:
        log.info("building %s into %s (once: later runs reuse it)", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass

    def _map(self, make: Callable[[Any], dict], items: Sequence) -> Iterator[dict]:
        """`make` over `items`, in order, in the worker processes."""
        if self._num_workers == 1:
            yield from map(make, items)
            return
        # "spawn": forking a process that may run threads (JAX, tqdm) can deadlock. An executor, unlike
        # multiprocessing.Pool, raises when a worker dies instead of waiting forever. map keeps the
        # order, so the examples do not depend on the number of workers.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self._num_workers, mp_context=context) as pool:
            for start in range(0, len(items), _BLOCK):
                yield from pool.map(make, items[start:start + _BLOCK], chunksize=16)


@dataclasses.dataclass(frozen=True)
class ManualDir:
    """A builder's manual directory; `path` and `glob` find its inputs or say exactly what is missing."""
    root: epath.Path
    builder: str
    instructions: str

    def __post_init__(self):
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.builder}: the manual directory {self.root} does not exist. Put "
                                    f"the official downloads there.\n{textwrap.dedent(self.instructions)}")

    def path(self, relative: str, download: str) -> epath.Path:
        """`root/relative`, which must exist; it comes from the official download `download`."""
        path = self.root / relative
        if not path.exists():
            raise FileNotFoundError(f"{self.builder}: expected {path}, from {download} extracted into "
                                    f"{self.root} (see MANUAL_DOWNLOAD_INSTRUCTIONS).")
        return path

    def glob(self, folder: str, pattern: str, download: str) -> list[epath.Path]:
        """The files matching `pattern` in `root/folder`, sorted; there must be some."""
        found = sorted(self.path(folder, download).glob(pattern))
        if not found:
            raise FileNotFoundError(f"{self.builder}: no {pattern} in {self.root / folder}, expected "
                                    f"from {download} (see MANUAL_DOWNLOAD_INSTRUCTIONS).")
        return found


class ManualBuilder(JaxsegBuilder, skip_registration=True):
    """An official dataset read from its extracted downloads in a manual directory (module docstring).

    Subclasses set MANUAL_DOWNLOAD_INSTRUCTIONS and HOMEPAGE, and define `_features`, `_split_items`
    (the inputs of each split, every file checked) and `_example` (one example from one item, in a
    worker process: a staticmethod, so that it pickles)."""

    HOMEPAGE: str

    def __init__(self, *, manual_dir: epath.PathLike | None = None, **kwargs):
        """`manual_dir`: the directory of the extracted downloads (see the module docstring). Other
        arguments: those of `JaxsegBuilder` (`num_workers`, `data_dir`, ...)."""
        self._given_manual_dir = manual_dir
        self._manual_dir: epath.Path | None = None  # resolved by download_and_prepare
        super().__init__(**kwargs)

    def download_and_prepare(self, *, download_dir: epath.PathLike | None = None,
                             download_config: tfds.download.DownloadConfig | None = None, **kwargs) -> None:
        config = download_config or tfds.download.DownloadConfig()
        if self._given_manual_dir is not None and config.manual_dir is not None:
            raise UserError(f"manual_dir given twice: {self._given_manual_dir} to the builder and "
                            f"{config.manual_dir} in download_config")
        # Resolved here rather than left to TFDS (same default) so that the errors can name it.
        manual_dir = (self._given_manual_dir or config.manual_dir
                      or epath.Path(download_dir or self.data_dir_root / "downloads") / "manual")
        self._manual_dir = epath.Path(manual_dir).expanduser()
        super().download_and_prepare(
            download_dir=download_dir,
            download_config=dataclasses.replace(config, manual_dir=self._manual_dir), **kwargs)

    @abc.abstractmethod
    def _features(self) -> dict:
        """The features of one example."""

    @abc.abstractmethod
    def _split_items(self, files: ManualDir) -> dict[str, list[tuple[Any, Any]]]:
        """{split: [(key, item)]}, in example order, after checking every file the items name."""

    @staticmethod
    @abc.abstractmethod
    def _example(item: Any) -> dict:
        """The example of one item."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.__doc__, features=tfds.features.FeaturesDict(self._features()),
            homepage=self.HOMEPAGE, metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)  # examples stay in `_split_items`'s (sorted) order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download; download_and_prepare resolved the manual directory
        files = ManualDir(self._manual_dir, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        # All splits are listed (and their files checked) before the generators write anything.
        splits = self._split_items(files)
        return {split: self._generate_examples(items) for split, items in splits.items()}

    def _generate_examples(self, items: list[tuple[Any, Any]]):
        keys = [key for key, _ in items]
        yield from zip(keys, self._map(self._example, [item for _, item in items]))


# ---------------------------------------------------------------------------------------------------
# Labels and the features of the semantic-segmentation datasets.

def image_png(path: epath.Path, shape: tuple[int, int]) -> bytes:
    """The image at `path` as RGB PNG bytes; its (H, W) must be `shape`, that of its labels."""
    with Image.open(path) as image:
        if (image.height, image.width) != tuple(shape):
            raise UserError(f"{path} is {image.height}x{image.width} (HxW) but its labels are "
                            f"{shape[0]}x{shape[1]}")
        if image.format == "PNG" and image.mode == "RGB":
            return path.read_bytes()  # already what the feature stores: skip a slow re-encoding
        return png(np.asarray(image.convert("RGB")))


def read_label(path: epath.Path) -> np.ndarray:
    """(H, W) uint8 ids of a single-channel label PNG (greyscale, or palette indices, as VOC's)."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise UserError(f"{path}: expected a greyscale or palette label PNG, got mode {image.mode}")
        return np.asarray(image)


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """(256,) uint8 table that maps each uint8 id to `mapping[id]`, and any other id to 255 (ignore)."""
    table = np.full(256, 255, np.uint8)
    table[list(mapping)] = list(mapping.values())
    return table


def multi_hot(class_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) uint8, 1 for each class in `class_ids`; other ids (255 = ignore) do not count."""
    present = np.unique(class_ids)
    labels = np.zeros(num_classes, np.uint8)
    labels[present[(present >= 0) & (present < num_classes)]] = 1
    return labels


def semantic_features(num_classes: int) -> dict:
    """image, semantic (uint8 ids, 255 = ignore), labels (multi-hot) and image_id (Text: the file name)."""
    return {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "semantic": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.uint8),
            "image_id": tfds.features.Text()}


def semantic_example(image_path: epath.Path, semantic: np.ndarray, labels: np.ndarray, image_id) -> dict:
    """The `semantic_features` of one image and its (H, W) uint8 labels."""
    return {"image": image_png(image_path, semantic.shape), "semantic": png(semantic), "labels": labels,
            "image_id": image_id}
