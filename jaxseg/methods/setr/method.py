"""SETR on dense labels (the dataset's own label space, 255 ignored) with mmseg's per-pixel cross-entropy
(mean over all pixels, ignored ones counting as 0), mmseg's training pipeline (ratio rescale, random crop
with cat_max_ratio 0.75, flip, photometric distortion: `jaxseg.data.augment.mmseg`) and mmseg's SETR
optimiser recipe (`SetrOptimizer`). The model is `jaxseg.models.setr`; the official configs' auxiliary
heads are not included.

BatchNorm in training: the trainer carries parameters and optimizer state only, so the running statistics
travel in the parameter tree: `init_params` gives {"params": ..., "batch_stats": ...}. Each step's forward
normalises with the batch statistics (over the global batch: SyncBN) and computes torch's running-statistic
update s' (momentum 0.1); the loss adds a term that is 0 in value and whose gradient with respect to each
running statistic s is (s - s') 2^-20, and the optimiser (`with_running_statistics`) steps the statistics
by minus that gradient x 2^20, so s becomes s' (to rounding), outside the recipe (no momentum, learning
rate or weight decay). Scaled so, the statistics add about 1e-6 of their change to the logged
`grad_norm`."""
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
from jaxseg.losses.gradient_clipping import pixel_cross_entropy
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.setr.predictors import SlidingPredictor
from jaxseg.metrics.accumulators import SemanticMetric
from jaxseg.models.setr import Setr
from jaxseg.ops.image import PIXEL_STATS
from jaxseg.train.optim import adamw_groups, path_names, scale_by_group_schedule

OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class SetrOptimizer:
    """mmseg's SETR recipe (a config's `optimizer` section): SGD with momentum (no Nesterov), weight decay 0,
    per-iteration poly decay (lr_g - min_lr) (1 - t / T)^power + min_lr of each group's rate lr_g; the
    decode head (mmseg's `custom_keys={'head': lr_mult}`) at `head_multiplier` x lr, the encoder and the MLA
    neck at lr. `name="adamw"` (with a linear warm-up over `warmup_steps`) trains small models from scratch."""
    name: str = "sgd"
    lr: float = setting(0.01, "finite and >= 0")
    min_lr: float = setting(1e-4, "finite and >= 0")
    head_multiplier: float = setting(10.0, "finite and >= 0")
    momentum: float = setting(0.9, "in [0, 1]")
    power: float = setting(0.9, ">= 0")
    weight_decay: float = setting(0.0, "finite and >= 0")
    warmup_steps: int = setting(0, ">= 0")

    def __post_init__(self):
        check_rules(self)
        if self.name not in OPTIMIZERS:
            raise UserError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")

    def build(self, params: Any, total_steps: int) -> optax.GradientTransformation:
        labels = jax.tree_util.tree_map(lambda name: "head" if name.startswith("head/") else "backbone",
                                        path_names(params))
        multipliers = jax.tree_util.tree_map(lambda _: 1.0, params)
        schedules = {}
        for group, rate in (("backbone", self.lr), ("head", self.lr * self.head_multiplier)):
            decay = optax.polynomial_schedule(rate, self.min_lr, self.power, total_steps - self.warmup_steps)
            schedules[group] = optax.join_schedules([optax.linear_schedule(0.0, rate, self.warmup_steps), decay],
                                                    [self.warmup_steps])
        if self.name == "adamw":
            return adamw_groups(labels, multipliers, schedules, weight_decay=self.weight_decay)
        return optax.chain(optax.add_decayed_weights(self.weight_decay) if self.weight_decay else optax.identity(),
                           optax.trace(decay=self.momentum),
                           scale_by_group_schedule(labels, multipliers, schedules))


# The running statistics' gradients are scaled by this power of two (exactly, and undone exactly by the
# optimiser) so that they leave the logged gradient norm that of the parameters.
STATISTICS_GRADIENT_SCALE = 2.0 ** -20


def running_statistics_term(old: Any, new: Any) -> jax.Array:
    """0, with gradient (s - s') x STATISTICS_GRADIENT_SCALE with respect to each running statistic s of
    `old` (s' its value in `new`)."""
    total = sum(jnp.sum(s * jax.lax.stop_gradient((s - n) * STATISTICS_GRADIENT_SCALE))
                for s, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    return total - jax.lax.stop_gradient(total)


def with_running_statistics(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` over the "params" half of {"params", "batch_stats"}; each running statistic moves by minus its
    gradient / STATISTICS_GRADIENT_SCALE, which `running_statistics_term` makes the step onto the batch's
    update."""
    def init(variables):
        return tx.init(variables["params"])

    def update(grads, state, variables=None):
        updates, state = tx.update(grads["params"], state, None if variables is None else variables["params"])
        steps = jax.tree.map(lambda g: -g / STATISTICS_GRADIENT_SCALE, grads["batch_stats"])
        return {"params": updates, "batch_stats": steps}, state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class SetrMethod:
    """`crop_size`: training crop and sliding window; `base_size`: the short side the mmseg rescale (and
    the predictor's scale 1) aims at (ADE20K: 512); `ratio_range`, `photometric`: the mmseg augmentation;
    `pixel_stats`: the input normalisation (`jaxseg.ops.image.PIXEL_STATS`), mmseg's ImageNet mean / std."""
    network_class: ClassVar[type] = Setr
    optimizer_class: ClassVar[type] = SetrOptimizer
    predictors: ClassVar[dict] = {"sliding": SlidingPredictor}
    metrics: ClassVar[dict] = {"semantic": SemanticMetric}
    model: dict
    optimizer: SetrOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    crop_size: int = setting(512, ">= 1")
    base_size: int = setting(512, ">= 1")
    ratio_range: tuple[float, float] = setting((0.5, 2.0), "> 0")
    photometric: bool = True
    pixel_stats: str = "imagenet"

    def __post_init__(self):
        check_rules(self)
        if self.pixel_stats not in PIXEL_STATS:
            raise UserError(f"method.pixel_stats must be one of {sorted(PIXEL_STATS)}, got {self.pixel_stats!r}")
        if self.data.pseudo_labels_dir:
            raise UserError(f"data.pseudo_labels_dir={self.data.pseudo_labels_dir!r}: SETR trains on the dataset's "
                            "ground truth; leave it empty")
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.label_space = self.data.ground_truth  # SETR learns the dataset's own labels

    def init_params(self, rng: jax.Array) -> Any:
        variables = self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return with_running_statistics(self.optimizer.build(params["params"], self.total_steps))

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        logits, updates = self.network.apply(params, batch["image"], train=True, rngs={"dropout": rng},
                                             mutable=["batch_stats"])
        cross_entropy = pixel_cross_entropy(logits, batch["semantic"]).mean()
        statistics = running_statistics_term(params["batch_stats"], updates["batch_stats"])
        return cross_entropy + statistics, {"cross_entropy": cross_entropy}

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = {"image": np.asarray(example["image"]), "semantic": np.asarray(example["semantic"])[..., 0]}
        out = weaktr_stage2_example(example, rng, crop=self.crop_size, base=self.base_size,
                                    ratio_range=self.ratio_range, photometric=self.photometric,
                                    pixel_stats=PIXEL_STATS[self.pixel_stats])
        return {"image": out["image"], "semantic": out["semantic"].astype(np.int32)}

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`)."""
        return dict(label_space=self.label_space, num_classes=self.model["num_classes"])

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "SETR predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "SETR metric")(self.model["num_classes"], **settings)
