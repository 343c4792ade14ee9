"""WeakTr (or MCTformer) stage 1: CAMs from image-level labels. The three soft-margin losses, AdamW with
timm's per-epoch cosine, timm's training augmentation (or flips only, `augmentation`); predictions are
multi-scale + flip CAMs and their pseudo-labels (`predictors`). Recipe values: docs/weaktr.md ("Stage-1
training recipe"). Optionally TransMix (`transmix`, off by default): CutMix batches whose labels are
weighted by the class tokens' last-layer attention over the pasted box (`jaxseg.losses.transmix`)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.timm import STAGE1_AUGMENTATIONS, weaktr_stage1_example
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.multilabel import cam_loss
from jaxseg.losses.transmix import TransMixConfig, cutmix, mix_labels, sample_box, transmix_lambda
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.weaktr.predictors import CamPredictor
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.vit import ViT
from jaxseg.models.vit_taps import tap_attention
from jaxseg.models.weaktr import WeakTr
from jaxseg.train.optim import Schedule, adamw_groups


def timm_cosine_per_epoch(base_lr: float, steps_per_epoch: int, epochs: int, *, warmup_epochs: int = 5,
                          warmup_lr: float = 1e-6, min_lr: float = 1e-5) -> Schedule:
    """timm's CosineLRScheduler (t in epochs, warm-up not prefixed) stepped once per epoch after it ends,
    so epoch e trains at lr(max(e - 1, 0)) and epoch 0 at the warm-up start."""
    def schedule(step):
        epoch = jnp.maximum(jnp.asarray(step, jnp.int32) // steps_per_epoch - 1, 0).astype(jnp.float32)
        warm = warmup_lr + epoch * (base_lr - warmup_lr) / max(warmup_epochs, 1)
        cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * epoch / epochs))
        return jnp.where(epoch < warmup_epochs, warm, cosine)
    return schedule


@dataclasses.dataclass(frozen=True)
class WeakTrOptimizer:
    """AdamW (eps 1e-8, weight decay on every parameter) on timm's per-epoch cosine (a config's
    `optimizer` section)."""
    lr: float = setting(6e-4 * 64 / 512, "finite and >= 0")
    weight_decay: float = setting(0.03, "finite and >= 0")
    warmup_epochs: int = setting(5, ">= 0")
    warmup_lr: float = setting(1e-6, "finite and >= 0")
    min_lr: float = setting(1e-5, "finite and >= 0")

    def __post_init__(self):
        check_rules(self)

    def build(self, params: Any, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        labels = jax.tree_util.tree_map(lambda _: "all", params)
        schedule = timm_cosine_per_epoch(self.lr, steps_per_epoch, epochs, warmup_epochs=self.warmup_epochs,
                                         warmup_lr=self.warmup_lr, min_lr=self.min_lr)
        return adamw_groups(labels, jax.tree_util.tree_map(lambda _: 1.0, params), {"all": schedule},
                            weight_decay=self.weight_decay)


@dataclasses.dataclass
class WeakTrMethod:
    """`steps_per_epoch` paces the schedule (the run is a whole number of epochs); C = the model's
    `num_classes` foreground classes, the first C entries of the dataset's image labels; `transmix`:
    TransMix on CutMix batches (`transmix_loss`), off unless `transmix.prob` > 0."""
    network_class: ClassVar[type] = WeakTr
    label_space: ClassVar[str] = "wsss"  # pseudo-labels: background 0, foreground class c as c + 1
    optimizer_class: ClassVar[type] = WeakTrOptimizer
    predictors: ClassVar[dict] = {"cams": CamPredictor}
    metrics: ClassVar[dict] = {"cam_sweep": CamSweepMetric}
    model: dict
    optimizer: WeakTrOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    steps_per_epoch: int = setting(1, ">= 1")
    crop_size: int = setting(224, ">= 1")
    augmentation: str = "timm"
    transmix: TransMixConfig = TransMixConfig()

    def __post_init__(self):
        check_rules(self)
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.num_classes = self.model["num_classes"]
        if self.steps_per_epoch < 1 or self.total_steps % self.steps_per_epoch:
            raise UserError(f"train.total_steps {self.total_steps} must be a whole number of epochs of "
                            f"method.steps_per_epoch={self.steps_per_epoch} steps")
        if self.augmentation not in STAGE1_AUGMENTATIONS:  # fail here, not in the data workers
            raise UserError(f"method.augmentation must be one of {STAGE1_AUGMENTATIONS}, got {self.augmentation!r}")
        if self.transmix.prob and self.model["encoder"].get("remat"):
            raise UserError("method.transmix reads the last block's attention, which a rematerialised encoder "
                            "hides: set model.encoder.remat=False or method.transmix.prob=0")

    def init_params(self, rng: jax.Array) -> Any:
        return self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))["params"]

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.steps_per_epoch, self.total_steps // self.steps_per_epoch)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        if not self.transmix.prob:
            out = self.network.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
            return cam_loss(out, batch["labels"])
        mix_rng, rng = jax.random.split(rng)
        box = sample_box(mix_rng, batch["image"].shape[1:3], self.transmix.prob, self.transmix.alpha)
        return self.transmix_loss(params, batch, box, rng)

    def transmix_loss(self, params: Any, batch: dict, box: jax.Array, rng: jax.Array):
        """The stage-1 loss of the batch CutMixed with `box` (yl, yh, xl, xh) (an empty box: no mix), its
        labels mixed with TransMix weights (`jaxseg.losses.transmix`). The official reads its one class
        token's attention; WeakTr has one class token per class, and class c's weight comes from token
        c's last-layer attention over the patches, averaged over the heads (`transmix.attention=
        "per_class"`: the token trained to find class c tells how much of class c the box holds), or one
        weight for every class from the mean of the C tokens' attention ("mean")."""
        images = cutmix(batch["image"], box)
        classes, encoder = self.num_classes, ViT(**self.model["encoder"])
        out, (tap,) = tap_attention(
            lambda: self.network.apply({"params": params}, images, train=True, rngs={"dropout": rng}),
            layers=(encoder.depth - 1,))
        attention = tap["probs"][:, :, :classes, classes:].mean(1)  # (B, C, P)
        if self.transmix.attention == "mean":
            attention = attention.mean(1, keepdims=True)
        grid = (images.shape[1] // encoder.patch_size, images.shape[2] // encoder.patch_size)
        lam = transmix_lambda(attention, box, images.shape[1:3], grid)
        loss, terms = cam_loss(out, mix_labels(batch["labels"], lam))
        return loss, {**terms, "transmix_lambda": lam.mean()}

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = {"image": np.asarray(example["image"]),
                   "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}
        return weaktr_stage1_example(example, rng, size=self.crop_size, augmentation=self.augmentation)

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`): background + the foreground."""
        return dict(label_space=self.label_space, num_classes=self.num_classes + 1)

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "WeakTr predictor")(self.network, self.num_classes,
                                                                 self.data.ground_truth, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "WeakTr metric")(self.num_classes, **settings)
