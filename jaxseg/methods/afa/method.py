"""AFA: single-stage weakly supervised segmentation (classification, affinity and segmentation heads trained
together from image-level labels), as rulixiang/afa `scripts/dist_train_voc.py` trains it.

One step on a batch of crops (images, labels, the crop's valid box):
  1. the network's forward pass: class logits, predicted affinity A (B, P, P), segmentation logits;
  2. without gradients, multi-scale CAMs with flips (`cams.multiscale_cams`, scales (1, 0.5, 1.5)) and the
     affinity of the largest scale;
  3. PAR pseudo-labels (`jaxseg.wsss.par.par_pseudo_labels`, background thresholds 0.35 / 0.55: class,
     background or ignored) -> affinity labels within `radius` patches -> the affinity loss of A;
  4. segmentation labels: the PAR pseudo-labels, and after `random_walk_fraction` of the run the random
     walk's (`jaxseg.wsss.random_walk.random_walk_pseudo_labels`, with the largest scale's affinity);
     segmentation logits upsampled to the crop, the background / foreground balanced cross-entropy;
  5. loss = soft-margin classification loss, plus `seg_weight` x segmentation + `aff_weight` x affinity
     once `cls_only_fraction` of the run is done (official: 2,000 and 6,000 of 20,000 iterations, 0.1 / 0.1).
Steps 2-4 run only after the classification-only phase (a `lax.cond`; the official computes and discards
them, so its logs show those losses from the start: here they read 0 until then). Augmentation: random
rescale (Pillow bilinear, U(0.5, 2)), horizontal flip, a random crop of a black-padded canvas whose image
box is the valid region (outside it every label is ignored). The CAM passes run in inference mode (the
official's run in training mode: MiT's stochastic depth is on in them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.common import normalize_image, random_hflip, resize
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.afa import affinity_labels, affinity_loss, balanced_cross_entropy
from jaxseg.losses.multilabel import multilabel_soft_margin
from jaxseg.methods.afa.cams import multiscale_cams, scaled_size
from jaxseg.methods.afa.predictors import CamPredictor, RandomWalkPredictor, SegmentationPredictor
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.metrics.accumulators import CamSweepMetric, SemanticMetric
from jaxseg.models.afa import Afa
from jaxseg.models.vit import ViT
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD
from jaxseg.ops.resize import resize as resize_array
from jaxseg.train.optim import Schedule, adamw_groups, path_names
from jaxseg.wsss.par import par_pseudo_labels
from jaxseg.wsss.random_walk import radius_mask, random_walk_pseudo_labels


def poly_warmup(base_lr: float, total_steps: int, warmup_steps: int, *, warmup_ratio: float = 1e-6,
                power: float = 1.0) -> Schedule:
    """AFA's `PolyWarmupAdamW`: base_lr (1 - (1 - t / W)(1 - warmup_ratio)) for t < W, then
    base_lr (1 - t / T)^power (t counted from the start of the run, not from the end of the warm-up)."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_ratio + (1.0 - warmup_ratio) * step / max(warmup_steps, 1)  # the same, without cancellation
        decay = jnp.maximum(1.0 - step / total_steps, 0.0) ** power
        return base_lr * jnp.where(step < warmup_steps, warm, decay)
    return schedule


@dataclasses.dataclass(frozen=True)
class AfaOptimizer:
    """AFA's recipe (a config's `optimizer` section): AdamW (betas 0.9 / 0.999, eps 1e-8) on `poly_warmup`;
    the heads (classifier, affinity, segmentation) at `head_multiplier` x the encoder's rate; with
    `freeze_encoder_norms` the encoder's LayerNorms never move (the official gives them lr 0)."""
    lr: float = setting(6e-5, "finite and >= 0")
    weight_decay: float = setting(0.01, "finite and >= 0")
    warmup_steps: int = setting(1500, ">= 0")
    warmup_ratio: float = setting(1e-6, "in [0, 1]")
    power: float = setting(1.0, ">= 0")
    head_multiplier: float = setting(10.0, "finite and >= 0")
    freeze_encoder_norms: bool = True

    def __post_init__(self):
        check_rules(self)

    def build(self, params: Any, total_steps: int) -> optax.GradientTransformation:
        def group(name: str) -> str:
            if not name.startswith("encoder/"):
                return "head"
            return "norm" if self.freeze_encoder_norms and "norm" in name else "encoder"
        labels = jax.tree_util.tree_map(group, path_names(params))
        multipliers = jax.tree_util.tree_map(lambda g: self.head_multiplier if g == "head" else 1.0, labels)
        schedule = poly_warmup(self.lr, total_steps, self.warmup_steps, warmup_ratio=self.warmup_ratio,
                               power=self.power)
        return adamw_groups(labels, multipliers, {"encoder": schedule, "head": schedule},
                            weight_decay=self.weight_decay, frozen=("norm",))


def denormalize(images: jax.Array) -> jax.Array:
    """ImageNet-normalised images back to RGB in [0, 1] (PAR's input, the official `denormalize_img2`)."""
    return images * jnp.asarray(IMAGENET_STD, images.dtype) + jnp.asarray(IMAGENET_MEAN, images.dtype)


def padded_crop(image: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The official `random_crop`: the image placed at a random offset on a black canvas of at least
    crop x crop, a random crop of that; returns (crop, bool mask of the image's pixels in it)."""
    height, width = image.shape[:2]
    canvas_h, canvas_w = max(crop, height), max(crop, width)
    top, left = int(rng.integers(canvas_h - height + 1)), int(rng.integers(canvas_w - width + 1))
    canvas = np.zeros((canvas_h, canvas_w, 3), image.dtype)
    canvas[top:top + height, left:left + width] = image
    valid = np.zeros((canvas_h, canvas_w), bool)
    valid[top:top + height, left:left + width] = True
    row, col = int(rng.integers(canvas_h - crop + 1)), int(rng.integers(canvas_w - crop + 1))
    return canvas[row:row + crop, col:col + crop], valid[row:row + crop, col:col + crop]


@dataclasses.dataclass
class AfaMethod:
    """C = the model's `num_classes` foreground classes, the first C entries of the dataset's image labels.
    `cam_scales` of the training CAMs (views rounded to whole patches: `cams.scaled_size`);
    `low_threshold` / `high_threshold` the background bands of the pseudo-labels; `radius` (patches) of the
    affinity labels and of the random walk; `par_dilations` / `par_iterations` PAR's; the schedule as
    fractions of `train.total_steps` (module docstring)."""
    network_class: ClassVar[type] = Afa
    label_space: ClassVar[str] = "wsss"  # background 0, foreground class c as c + 1
    optimizer_class: ClassVar[type] = AfaOptimizer
    predictors: ClassVar[dict] = {"cams": CamPredictor, "random_walk": RandomWalkPredictor,
                                  "semantic": SegmentationPredictor}
    metrics: ClassVar[dict] = {"cam_sweep": CamSweepMetric, "semantic": SemanticMetric}
    model: dict
    optimizer: AfaOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    crop_size: int = setting(320, ">= 1")
    scale_range: tuple[float, float] = setting((0.5, 2.0), "> 0")
    cam_scales: tuple[float, ...] = setting((1.0, 0.5, 1.5), "> 0")
    low_threshold: float = setting(0.35, "in [0, 1]")
    high_threshold: float = setting(0.55, "in [0, 1]")
    radius: int = setting(8, ">= 1")
    par_dilations: tuple[int, ...] = setting((1, 2, 4, 8, 12, 24), ">= 1")
    par_iterations: int = setting(10, ">= 0")
    cls_only_fraction: float = setting(0.1, "in [0, 1]")
    random_walk_fraction: float = setting(0.3, "in [0, 1]")
    seg_weight: float = setting(0.1, "finite and >= 0")
    aff_weight: float = setting(0.1, "finite and >= 0")

    def __post_init__(self):
        check_rules(self)
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.patch = self.model["encoder"].get("patch_size", ViT.patch_size)
        if self.low_threshold > self.high_threshold:
            raise UserError(f"method.low_threshold={self.low_threshold} must not exceed "
                            f"method.high_threshold={self.high_threshold}")
        self.num_classes = self.model["num_classes"]
        self.grid = (self.crop_size // self.patch,) * 2
        largest = scaled_size((self.crop_size, self.crop_size), max(self.cam_scales), self.patch)
        self.large_grid = (largest[0] // self.patch, largest[1] // self.patch)
        self.cls_steps = round(self.cls_only_fraction * self.total_steps)
        self.random_walk_step = round(self.random_walk_fraction * self.total_steps)

    def init_params(self, rng: jax.Array) -> Any:
        return self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))["params"]

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.total_steps)

    def cam_fn(self, params: Any):
        """The CAM passes of `cams.multiscale_cams` with these (stopped) parameters."""
        def run(views, with_affinity):
            return self.network.apply({"params": params}, views, affinity=with_affinity, method=Afa.cams)
        return run

    def pseudo_labels(self, params: Any, images: jax.Array, labels: jax.Array, valid: jax.Array,
                      step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(PAR pseudo-labels, segmentation labels) (B, H, W) of a batch (steps 2-4 of the module docstring)."""
        cams, large_affinity = multiscale_cams(self.cam_fn(jax.lax.stop_gradient(params)), images, labels,
                                               self.cam_scales, self.patch)
        rgb = denormalize(images)
        bands = dict(low=self.low_threshold, high=self.high_threshold, valid=valid,
                     dilations=self.par_dilations, num_iter=self.par_iterations)
        par_labels = par_pseudo_labels(rgb, cams, labels, **bands)
        seg_labels = jax.lax.cond(
            step > self.random_walk_step,
            lambda: random_walk_pseudo_labels(rgb, cams, labels, large_affinity, self.large_grid,
                                              radius=self.radius, **bands),
            lambda: par_labels)
        return par_labels, seg_labels

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        images, labels, valid = batch["image"], batch["labels"], batch["valid"]
        out = self.network.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        cls_loss = multilabel_soft_margin(out["cls_logits"], labels)

        def joint():
            par_labels, seg_labels = self.pseudo_labels(params, images, labels, valid, step)
            targets = affinity_labels(par_labels, self.grid, radius_mask(self.grid, self.radius))
            aff_loss, counts = affinity_loss(out["affinity"], targets)
            seg_logits = resize_array(out["seg_logits"], images.shape[1:3])
            seg_loss = balanced_cross_entropy(seg_logits, seg_labels)
            total = cls_loss + self.seg_weight * seg_loss + self.aff_weight * aff_loss
            return total, {"seg": seg_loss, "aff": aff_loss, "ignored": (seg_labels == 255).mean(),
                           **{k: v.astype(jnp.float32) for k, v in counts.items()}}

        def classification_only():
            zero = jnp.zeros((), jnp.float32)
            return cls_loss, {"seg": zero, "aff": zero, "ignored": zero, "positive_pairs": zero,
                              "negative_pairs": zero}

        total, terms = jax.lax.cond(step > self.cls_steps, joint, classification_only)
        return total, {"cls": cls_loss, **terms}

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(example["image"])
        scale = rng.uniform(*self.scale_range)
        size = (int(scale * image.shape[0]), int(scale * image.shape[1]))
        if min(size) < 1:
            raise UserError(f"method.scale_range {self.scale_range} shrinks a {image.shape[0]}x{image.shape[1]} "
                            f"image to nothing")
        image = random_hflip(resize({"image": image}, size), rng)["image"]
        crop, valid = padded_crop(image, self.crop_size, rng)
        return {"image": normalize_image(crop), "valid": valid,
                "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`): background + the foreground."""
        return dict(label_space=self.label_space, num_classes=self.num_classes + 1)

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "AFA predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "AFA metric")(self.num_classes if kind == "cam_sweep"
                                                        else self.num_classes + 1, **settings)
