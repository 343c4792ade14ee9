"""Prompt-CAM's training side: class prompts and a shared scorer on a frozen ViT, trained from image-level
labels. The official recipe (Imageomics/Prompt_CAM `experiment/config/prompt_cam/*/args.yaml`,
`engine/trainer.py`, `data/dataset/utils.py`): cross-entropy on the C prompt scores; SGD (momentum 0.9, wd
0.001, lr 0.005 for DINO, 0.001 for DINOv2) on timm's per-epoch cosine (20 warm-up epochs from 0, minimum
1e-6) over 130 epochs; only the prompts and the head train; images resized to 240/224 of the crop, randomly
cropped, flipped and normalised with the Inception statistics (0.5 / 0.5). Datasets with several labels per
image (the scenes, VOC, COCO) take the multi-label soft-margin loss instead (`classification="multilabel"`,
as WeakTr's stage 1). Docs: docs/prompt_cam.md."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.common import normalize_image, random_crop, random_hflip, resize
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.multilabel import multilabel_soft_margin, soft_target_cross_entropy
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.prompt_cam.predictors import TraitMapPredictor
from jaxseg.methods.weaktr.method import timm_cosine_per_epoch
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.metrics.attention_mass import AttentionMassMetric
from jaxseg.models.prompt_cam import PromptCAM
from jaxseg.models.vit import ViT
from jaxseg.ops.image import PIXEL_STATS
from jaxseg.train.optim import adamw_groups, regex_labels

ENCODER = "encoder"  # the ViT's subtree of Prompt-CAM's params (`PromptCAM.setup`)
OPTIMIZERS = ("sgd", "adamw")
CLASSIFICATIONS = ("softmax", "multilabel")
# The official training resize: 240 px for 224 px crops.
RESIZE_RATIO = 240 / 224


@dataclasses.dataclass(frozen=True)
class PromptCamOptimizer:
    """The recipe (a config's `optimizer` section): SGD with momentum (torch's: weight decay added to the
    gradient, no Nesterov) or torch-AdamW (`name="adamw"`), on timm's per-epoch cosine
    (`jaxseg.methods.weaktr.timm_cosine_per_epoch`).

    `freeze_encoder` (the method): the ViT (every `encoder/...` parameter, its final norm included) gets no
    weight gradients, no update and no optimizer state; only the prompts and the head learn. False trains
    the encoder too, at the same rate (for a backbone that is not pretrained). Toggling it changes the
    optimizer state, so a run cannot resume across the switch."""
    name: str = "sgd"
    lr: float = setting(5e-3, "finite and >= 0")
    weight_decay: float = setting(1e-3, "finite and >= 0")
    momentum: float = setting(0.9, "in [0, 1]")
    warmup_epochs: int = setting(20, ">= 0")
    warmup_lr: float = setting(0.0, "finite and >= 0")
    min_lr: float = setting(1e-6, "finite and >= 0")
    freeze_encoder: bool = True

    def __post_init__(self):
        check_rules(self)
        if self.name not in OPTIMIZERS:
            raise UserError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")

    def build(self, params: Any, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        schedule = timm_cosine_per_epoch(self.lr, steps_per_epoch, epochs, warmup_epochs=self.warmup_epochs,
                                         warmup_lr=self.warmup_lr, min_lr=self.min_lr)
        groups = regex_labels(params, [(rf"^{ENCODER}/", "frozen" if self.freeze_encoder else "trained")],
                              "trained")
        if self.name == "adamw":
            return adamw_groups(groups, jax.tree_util.tree_map(lambda _: 1.0, params), {"trained": schedule},
                                weight_decay=self.weight_decay, frozen=("frozen",))
        sgd = optax.chain(optax.add_decayed_weights(self.weight_decay), optax.trace(decay=self.momentum),
                          optax.scale_by_learning_rate(schedule))
        # The same mechanism as `adamw_groups(frozen=...)`: frozen leaves get no state and a zero update.
        return optax.partition({"trained": sgd, "frozen": optax.set_to_zero()}, groups)


@dataclasses.dataclass
class PromptCamMethod:
    """`steps_per_epoch` paces the schedule (the run is a whole number of epochs); C = the model's
    `num_classes`, the first C entries of the dataset's image labels. `classification`: "softmax" (the official
    cross-entropy; an image with several labels takes each at 1/k) or "multilabel" (soft margin, for
    datasets with several classes per image). `pixel_stats`: the input normalisation in training and
    prediction (`jaxseg.ops.image.PIXEL_STATS`; the official code uses "inception", an encoder trained
    with ImageNet statistics such as WeakTr's wants "imagenet")."""
    network_class: ClassVar[type] = PromptCAM
    label_space: ClassVar[str] = "wsss"  # the CAMs' pseudo-labels: background 0, class c as c + 1
    optimizer_class: ClassVar[type] = PromptCamOptimizer
    predictors: ClassVar[dict] = {"cams": TraitMapPredictor}
    metrics: ClassVar[dict] = {"cam_sweep": CamSweepMetric, "attention_mass": AttentionMassMetric}
    model: dict
    optimizer: PromptCamOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    steps_per_epoch: int = setting(1, ">= 1")
    crop_size: int = setting(224, ">= 1")
    classification: str = "softmax"
    pixel_stats: str = "inception"

    def __post_init__(self):
        check_rules(self)
        if self.classification not in CLASSIFICATIONS:
            raise UserError(f"method.classification must be one of {CLASSIFICATIONS}, got {self.classification!r}")
        if self.pixel_stats not in PIXEL_STATS:
            raise UserError(f"method.pixel_stats must be one of {sorted(PIXEL_STATS)}, got {self.pixel_stats!r}")
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.num_classes = self.model["num_classes"]
        self.patch_size = self.model["encoder"].get("patch_size", ViT.patch_size)
        if self.total_steps % self.steps_per_epoch:
            raise UserError(f"train.total_steps {self.total_steps} must be a whole number of epochs of "
                            f"method.steps_per_epoch={self.steps_per_epoch} steps")

    def init_params(self, rng: jax.Array) -> Any:
        return self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))["params"]

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.steps_per_epoch, self.total_steps // self.steps_per_epoch)

    def loss_fn(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        loss = soft_target_cross_entropy if self.classification == "softmax" else multilabel_soft_margin
        return loss(logits, labels)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        if self.optimizer.freeze_encoder:
            # A constant to the gradient: XLA computes no weight gradients for the encoder, while its
            # activations stay differentiable and carry the prompts' gradients.
            params = {**params, ENCODER: jax.lax.stop_gradient(params[ENCODER])}
        logits = self.network.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})["logits"]
        loss = self.loss_fn(logits, batch["labels"])
        accuracy = (jnp.argmax(logits, -1)[:, None] == jnp.arange(self.num_classes)) * batch["labels"]
        return loss, {"classification": loss, "top1_in_labels": accuracy.sum(-1).mean()}

    def predicted_labels(self, logits: jax.Array) -> jax.Array:
        """(C,) multi-hot of the classes one image's scores predict: sigmoid > 0.5 for the multi-label loss,
        the best score for the single-label one."""
        if self.classification == "multilabel":
            return (logits > 0).astype(jnp.float32)
        return jax.nn.one_hot(jnp.argmax(logits), self.num_classes)

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        """The official training transform at `crop_size`: resize to 240/224 of it, random crop, flip,
        normalisation with `pixel_stats`."""
        size = self.crop_size
        resized = round(size * RESIZE_RATIO)
        x = random_hflip(random_crop(resize({"image": np.asarray(example["image"])}, (resized, resized)), rng,
                                     (size, size)), rng)
        return {"image": normalize_image(x["image"], *PIXEL_STATS[self.pixel_stats]),
                "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`): background + the foreground."""
        return dict(label_space=self.label_space, num_classes=self.num_classes + 1)

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "Prompt-CAM predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "Prompt-CAM metric")(self.num_classes, **settings)
