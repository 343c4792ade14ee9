"""Segmenter on dense labels: WeakTr's stage 2 (pseudo-labels from `data.pseudo_labels_dir`, the
gradient-clipping loss, SGD-Nesterov poly with the encoder at 0.1x, mmseg augmentation) or, with
`clipping=False` on ground truth, the plain Segmenter. Labels are in the WSSS space: 0 background, c + 1
foreground class c (`num_classes - 1` foreground classes). Recipe values: docs/weaktr.md ("Stage-2 data
and training recipe")."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.mmseg import weaktr_stage2_example
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.gradient_clipping import gradient_clipping_loss, pixel_cross_entropy
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.segmenter.predictors import MultiScaleFlipPredictor
from jaxseg.metrics.accumulators import SemanticMetric
from jaxseg.models.segmenter import Segmenter
from jaxseg.ops.image import PIXEL_STATS
from jaxseg.train.optim import adamw_groups, path_names, scale_by_group_schedule
from jaxseg.wsss.cam import wsss_semantic

OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class SegmenterOptimizer:
    """Segmenter's recipe (a config's `optimizer` section): SGD with Nesterov momentum, per-iteration poly
    decay (lr - min_lr) (1 - t / T)^power + min_lr, encoder parameters at `encoder_multiplier` x that rate.
    `name="adamw"` (with a linear warm-up over `warmup_steps`) trains small models from scratch, where SGD
    stays at the background prior."""
    name: str = "sgd"
    lr: float = setting(1e-4, "finite and >= 0")
    min_lr: float = setting(1e-5, "finite and >= 0")
    encoder_multiplier: float = setting(0.1, "finite and >= 0")
    momentum: float = setting(0.9, "in [0, 1]")
    power: float = setting(0.9, ">= 0")
    weight_decay: float = setting(0.0, "finite and >= 0")
    warmup_steps: int = setting(0, ">= 0")

    def __post_init__(self):
        check_rules(self)
        if self.name not in OPTIMIZERS:
            raise UserError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")

    def build(self, params: Any, total_steps: int) -> optax.GradientTransformation:
        if self.warmup_steps >= total_steps:  # optax would hold the rate below its peak for the whole run
            raise UserError(f"train.total_steps {total_steps} must exceed optimizer.warmup_steps "
                            f"{self.warmup_steps}")
        multipliers = jax.tree_util.tree_map(lambda name: self.encoder_multiplier if name.startswith("encoder/")
                                             else 1.0, path_names(params))
        labels = jax.tree_util.tree_map(lambda _: "all", params)
        decay = optax.polynomial_schedule(self.lr, self.min_lr, self.power, total_steps - self.warmup_steps)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, self.lr, self.warmup_steps), decay],
                                        [self.warmup_steps])
        if self.name == "adamw":
            return adamw_groups(labels, multipliers, {"all": schedule}, weight_decay=self.weight_decay)
        return optax.chain(optax.add_decayed_weights(self.weight_decay) if self.weight_decay else optax.identity(),
                           optax.trace(decay=self.momentum, nesterov=True),
                           scale_by_group_schedule(labels, multipliers, {"all": schedule}))


@dataclasses.dataclass
class SegmenterMethod:
    """`base_size` is the short side the mmseg rescale (and the predictor's scale 1) aims at; `clipping`,
    `clip_cell_size`, `start_value`: the gradient-clipping loss (`jaxseg.losses.gradient_clipping`);
    `pixel_stats`: the input normalisation (`jaxseg.ops.image.PIXEL_STATS`) in training and prediction,
    "inception" (0.5 / 0.5) for rstrudel/segmenter's ViT backbones (WeakTr's ViT-S/16 at 384)."""
    network_class: ClassVar[type] = Segmenter
    label_space: ClassVar[str] = "wsss"  # trained on pseudo-labels or on ground truth mapped to them
    optimizer_class: ClassVar[type] = SegmenterOptimizer
    predictors: ClassVar[dict] = {"sliding": MultiScaleFlipPredictor}
    metrics: ClassVar[dict] = {"semantic": SemanticMetric}
    model: dict
    optimizer: SegmenterOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    crop_size: int = setting(480, ">= 1")
    base_size: int = setting(520, ">= 1")
    ratio_range: tuple[float, float] = setting((0.5, 2.0), "> 0")
    photometric: bool = True
    clipping: bool = True
    clip_cell_size: int = setting(120, ">= 1")
    start_value: float = setting(1.2, "finite and >= 0")
    pixel_stats: str = "imagenet"

    def __post_init__(self):
        check_rules(self)
        if self.pixel_stats not in PIXEL_STATS:
            raise UserError(f"method.pixel_stats must be one of {sorted(PIXEL_STATS)}, got {self.pixel_stats!r}")
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.num_foreground = self.model["num_classes"] - 1
        if self.clipping and not self.data.pseudo_labels_dir:
            raise UserError("the gradient-clipping loss is for pseudo-labels: set data.pseudo_labels_dir (written "
                            "by tools/make_pseudo_labels.py) or method.clipping=False to train on ground truth")
        # Pseudo-labels are written in the WSSS space; ground truth comes in the dataset's.
        self.train_labels = "wsss" if self.data.pseudo_labels_dir else self.data.ground_truth

    def init_params(self, rng: jax.Array) -> Any:
        return self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))["params"]

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.total_steps)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        logits = self.network.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})[-1]
        cross_entropy = pixel_cross_entropy(logits, batch["semantic"]).mean()
        if not self.clipping:
            return cross_entropy, {"cross_entropy": cross_entropy}
        loss, kept = gradient_clipping_loss(logits, batch["semantic"], patch_size=self.clip_cell_size,
                                            start_value=self.start_value)
        return loss, {"cross_entropy": cross_entropy, "kept_fraction": kept.mean()}

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = {"image": np.asarray(example["image"]),
                   "semantic": wsss_semantic(example, self.num_foreground, self.train_labels).astype(np.uint8)}
        out = weaktr_stage2_example(example, rng, crop=self.crop_size, base=self.base_size,
                                    ratio_range=self.ratio_range, photometric=self.photometric,
                                    pixel_stats=PIXEL_STATS[self.pixel_stats])
        return {"image": out["image"], "semantic": out["semantic"].astype(np.int32)}

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`): background + the foreground."""
        return dict(label_space=self.label_space, num_classes=self.num_foreground + 1)

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "Segmenter predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "Segmenter metric")(self.num_foreground + 1, **settings)
