"""Weakly supervised segmentation as trainer `Task`s: WeakTr / MCTformer stage 1 (CAMs from image-level
labels) and the Segmenter of stage 2 (trained on pseudo-labels with the gradient-clipping loss, or on
ground truth as the plain Segmenter baseline).

Label spaces. A WSSS dataset has C foreground classes: image labels are (C,) multi-hot and dense labels
are 0 = background, c + 1 = foreground class c. `ground_truth="categories"` reads datasets whose
semantic maps hold category ids with the foreground categories first (the generated scenes' things,
COCO panoptic's 80 things; `labels` is cut to the first C entries), `"wsss"` datasets already in that
space (VOC).
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxseg.data.datasets import image_name
from jaxseg.data.pipeline import train_dataset
from jaxseg.data.transforms import STAGE1_AUGMENTATIONS, normalize_image, weaktr_stage1_example, weaktr_stage2_example
from jaxseg.inference.semantic import multiscale_flip_probs
from jaxseg.losses.gradient_clipping import gradient_clipping_loss, pixel_cross_entropy
from jaxseg.losses.multilabel import cam_loss
from jaxseg.models.segmenter import Segmenter, combine_readouts
from jaxseg.models.weaktr import WeakTr
from jaxseg.train.evaluation import evaluate_semantic
from jaxseg.train.optim import segmenter_optimizer, weaktr_cam_optimizer
from jaxseg.wsss.cam import ThresholdSweep, foreground_labels, image_cams, pseudo_label

GROUND_TRUTHS = ("categories", "wsss")
# Background threshold of the pseudo-labels (WeakTr's choice for VOC): `tools/make_pseudo_labels.py` and
# `WeakTrCamTask.infer`.
PSEUDO_LABEL_THRESHOLD = 0.43


def wsss_semantic(example: dict, num_foreground: int, ground_truth: str) -> np.ndarray:
    """(H, W) dense labels of an example in the WSSS label space (module docstring)."""
    if ground_truth not in GROUND_TRUTHS:
        raise ValueError(f"ground_truth must be one of {GROUND_TRUTHS}, got {ground_truth!r}")
    semantic = np.asarray(example["semantic"])[..., 0]
    return foreground_labels(semantic, num_foreground) if ground_truth == "categories" else semantic


class PseudoLabelSource:
    """A random-access source whose "semantic" maps are replaced by pseudo-label PNGs named
    `<image name>.png` (`jaxseg.data.datasets.image_name`) in `directory` (what
    `tools/make_pseudo_labels.py` writes)."""

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


class _ImageTask:
    """Init from a crop-sized batch and the grain training pipeline over `transform`."""

    def init_params(self, rng: jax.Array) -> Any:
        images = jnp.zeros((1, self.crop_size, self.crop_size, 3))
        return self.network.init({"params": rng}, images)["params"]

    def train_data(self, seed: int):
        return iter(train_dataset(self.source, self.transform, seed=seed, batch_size=self.batch_size))


@dataclasses.dataclass
class WeakTrCamTask(_ImageTask):
    """WeakTr (or MCTformer) stage 1 with its recipe: the three soft-margin losses, AdamW (wd 0.03 on all
    parameters) with timm's per-epoch cosine, timm's training augmentation (`augmentation`, see
    `weaktr_stage1_example`); evaluation = CAM mIoU over a background-threshold sweep (multi-scale + flip
    CAMs, refined by the patch attention unless `refine_cams` is False, normalised)."""
    model: dict
    source: Sequence[dict]
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    crop_size: int
    lr: float
    weight_decay: float = 0.03
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    ground_truth: str = "categories"
    eval_source: Sequence[dict] | None = None
    eval_scales: tuple[float, ...] = (1.0, 1.2)
    augmentation: str = "timm"
    refine_cams: bool = True
    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 20))
    threshold: float = PSEUDO_LABEL_THRESHOLD  # of `infer`'s label maps

    def __post_init__(self):
        self.network = WeakTr(**self.model)
        self.num_classes = self.model["num_classes"]
        self._cams = jax.jit(self._cam_outputs)  # one compilation per input size, across evaluations
        if self.total_steps % self.steps_per_epoch:
            raise ValueError(f"total_steps {self.total_steps} must be a whole number of epochs of "
                             f"{self.steps_per_epoch} steps")
        if self.augmentation not in STAGE1_AUGMENTATIONS:  # fail here, not in the data workers
            raise ValueError(f"augmentation must be one of {STAGE1_AUGMENTATIONS}, got {self.augmentation!r}")

    def optimizer(self, params: Any):
        return weaktr_cam_optimizer(params, steps_per_epoch=self.steps_per_epoch,
                                    epochs=self.total_steps // self.steps_per_epoch, lr=self.lr,
                                    weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs,
                                    warmup_lr=self.warmup_lr, min_lr=self.min_lr)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        out = self.network.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        loss, terms = cam_loss(out, batch["labels"])
        return loss, terms

    def transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = {"image": np.asarray(example["image"]),
                   "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}
        return weaktr_stage1_example(example, rng, size=self.crop_size, augmentation=self.augmentation)

    def _cam_outputs(self, params: Any, views: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        out = self.network.apply({"params": params}, views)
        # Both image-level heads are trained by the same multi-label loss: their mean is the prediction.
        probs = (jax.nn.sigmoid(out["cls_logits"]) + jax.nn.sigmoid(out["coarse_logits"])) / 2
        return out["fused_cam"], out["patch_attention"], probs

    def normalized_cams(self, params: Any, image: np.ndarray, present: np.ndarray) -> np.ndarray:
        """(C, H, W) multi-scale + flip CAMs of a uint8 (H, W, 3) image over `eval_scales`, refined (if
        `refine_cams`) and min-max normalised per present class ((C,) multi-hot `present`; absent classes
        are 0)."""
        def cam_fn(views):  # params as an argument, not baked into the program as constants
            fused, patch_attention, _ = self._cams(params, views)
            return fused, patch_attention if self.refine_cams else None

        return np.asarray(image_cams(cam_fn, image, present, self.model["encoder"]["patch_size"], self.eval_scales))

    def predicted_labels(self, params: Any, image: np.ndarray) -> np.ndarray:
        """(C,) multi-hot of the classes the model finds in a uint8 (H, W, 3) image: mean sigmoid of the
        class-token and coarse-CAM logits > 0.5, from the image cropped to whole patches (the view
        `multiscale_cams` passes at scale 1: with 1.0 in `eval_scales` no extra compilation)."""
        patch = self.model["encoder"]["patch_size"]
        rows, cols = image.shape[0] // patch * patch, image.shape[1] // patch * patch
        if rows == 0 or cols == 0:
            raise ValueError(f"the {image.shape[0]}x{image.shape[1]} image is smaller than one {patch} px "
                             f"patch")
        probs = self._cams(params, normalize_image(image)[None, :rows, :cols])[2][0]
        return (np.asarray(probs) > 0.5).astype(np.float32)

    def infer(self, params: Any, image: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """One uint8 (H, W, 3) image -> {"semantic": (H, W) pseudo-label map at `threshold` (0 background,
        c + 1 class c), "cams": (C, H, W) normalised CAMs, "cam_classes": the present classes' indices}.
        `labels`: image-level multi-hot labels (cut to the C classes as in `evaluate`); None: the classes
        the model predicts present."""
        if labels is None:
            present = self.predicted_labels(params, image)
        else:
            present = np.asarray(labels[:self.num_classes], np.float32)
        cams = self.normalized_cams(params, image, present)
        return {"semantic": np.asarray(pseudo_label(cams, present, self.threshold)), "cams": cams,
                "cam_classes": np.flatnonzero(present)}

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh, rules) -> dict:
        """CAM mIoU (background + C classes) of every `eval_source` example at each threshold. Every host
        computes all of it (images differ in size, so this runs per image, not in global batches)."""
        if self.eval_source is None:
            return {}
        accumulator = ThresholdSweep(self.num_classes, self.thresholds)
        for i in range(len(self.eval_source)):
            example = self.eval_source[i]
            present = np.asarray(example["labels"][:self.num_classes], np.float32)
            accumulator.add(self.normalized_cams(params, np.asarray(example["image"]), present), present,
                            wsss_semantic(example, self.num_classes, self.ground_truth))
        sweep = accumulator.result()
        return {"cam_miou": float(sweep["best_miou"]), "best_threshold": float(sweep["best_threshold"]),
                "cam_miou_curve": [float(v) for v in sweep["miou"]], "thresholds": list(self.thresholds),
                "examples": len(self.eval_source)}


@dataclasses.dataclass
class SegmenterTask(_ImageTask):
    """Segmenter on dense labels: WeakTr stage 2 (pseudo-labels, gradient-clipping loss, SGD-Nesterov
    with the encoder at 0.1x, mmseg augmentation) or, with `clipping=False` and ground truth, the plain
    Segmenter. Evaluation: single-scale mIoU of the read-out combination `readout_weights`."""
    model: dict
    source: Sequence[dict]
    total_steps: int
    batch_size: int
    crop_size: int
    base_size: int
    num_foreground: int
    lr: float = 1e-4
    min_lr: float = 1e-5
    encoder_multiplier: float = 0.1
    optimizer_name: str = "sgd"  # "adamw" for small models trained from scratch
    warmup_steps: int = 0
    ratio_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    clipping: bool = True
    clip_cell_size: int = 120
    start_value: float = 1.2
    ground_truth: str = "categories"
    eval_ground_truth: str = "categories"  # training labels may be pseudo-labels, evaluation reads GT
    readout_weights: tuple[float, ...] = (0.8, 1.0)
    eval_source: Sequence[dict] | None = None
    infer_scales: tuple[float, ...] = (1.0,)  # of `infer`, relative to `base_size`

    def __post_init__(self):
        self.network = Segmenter(**self.model)
        self._window_scores = jax.jit(self._log_scores)  # params as an argument: one program across calls
        if self.model["num_classes"] != self.num_foreground + 1:
            raise ValueError(f"a WSSS Segmenter has background + {self.num_foreground} classes, the model "
                             f"has {self.model['num_classes']}")

    def optimizer(self, params: Any):
        return segmenter_optimizer(params, total_steps=self.total_steps, lr=self.lr, min_lr=self.min_lr,
                                   encoder_multiplier=self.encoder_multiplier, optimizer=self.optimizer_name,
                                   warmup_steps=self.warmup_steps)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        logits = self.network.apply({"params": params}, batch["image"], train=True,
                                    rngs={"dropout": rng})[-1]
        cross_entropy = pixel_cross_entropy(logits, batch["semantic"]).mean()
        if not self.clipping:
            return cross_entropy, {"cross_entropy": cross_entropy}
        loss, kept = gradient_clipping_loss(logits, batch["semantic"], patch_size=self.clip_cell_size,
                                            start_value=self.start_value)
        return loss, {"cross_entropy": cross_entropy, "kept_fraction": kept.mean()}

    def transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = {"image": np.asarray(example["image"]),
                   "semantic": wsss_semantic(example, self.num_foreground, self.ground_truth).astype(np.uint8)}
        out = weaktr_stage2_example(example, rng, crop=self.crop_size, base=self.base_size,
                                    ratio_range=self.ratio_range, photometric=self.photometric)
        return {"image": out["image"], "semantic": out["semantic"].astype(np.int32)}

    def _log_scores(self, params: Any, windows: jax.Array) -> jax.Array:
        """(n, N, h, w) log of the read-out combination of (n, h, w, 3) windows: `multiscale_flip_probs`
        soft-maxes what it gets, and softmax(log s) = s / sum(s), so the passes average the combined score
        (normalised by the sum of `readout_weights`)."""
        scores = combine_readouts(self.network.apply({"params": params}, windows), self.readout_weights)
        return jnp.moveaxis(jnp.log(scores), -1, 1)

    def infer(self, params: Any, image: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """One uint8 (H, W, 3) image -> {"semantic": (H, W) int32 map (0 background, c + 1 class c)}:
        Segmenter's sliding windows (crop_size, stride 2/3 of it) over `infer_scales` x {plain, flipped}
        with short side scale * base_size. `labels` is not used (image-level labels only steer CAMs)."""
        def score_fn(windows):
            return self._window_scores(params, windows)

        probs = multiscale_flip_probs(score_fn, normalize_image(image), self.infer_scales,
                                      base_short_side=self.base_size, window=self.crop_size,
                                      stride=self.crop_size * 2 // 3)
        return {"semantic": np.asarray(jnp.argmax(probs, axis=0), np.int32)}

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh, rules) -> dict:
        """mIoU of `infer` (sliding windows at `infer_scales`) on `eval_source` against its ground truth."""
        if self.eval_source is None:
            return {}
        return evaluate_semantic(self.infer, params, self.eval_source,
                                 lambda example: wsss_semantic(example, self.num_foreground, self.eval_ground_truth),
                                 self.num_foreground + 1)
