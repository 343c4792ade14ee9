"""EoMT's training side: targets from the dataset's segments, masked-attention annealing over the run, the
set loss on all L2 + 1 predictions, the augmentation chain and the optimiser recipe (AdamW with LLRD and the
two-stage warm-up). Recipe values: docs/eomt.md ("Training recipe")."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.eomt import eomt_train_example
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.mask_classification import SetLossConfig, Targets, set_loss
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.eomt.annealing import mask_annealing_probs, mask_annealing_windows
from jaxseg.methods.eomt.predictors import PREDICTORS, mask_example
from jaxseg.metrics.accumulators import InstanceMetric, PanopticMetric, SemanticMetric
from jaxseg.models.eomt import EoMT
from jaxseg.train.optim import adamw_groups, layer_decay, regex_labels, warmup_poly

SEGMENTATIONS = ("semantic", "panoptic", "instance")
ENCODER = "encoder"  # the ViT's subtree of EoMT's params (`EoMT.setup`)


@dataclasses.dataclass(frozen=True)
class EomtOptimizer:
    """The recipe (a config's `optimizer` section): AdamW (wd on all parameters), LLRD over the encoder,
    heads warming up over warmup[0] steps, the encoder frozen (lr 0, moments accumulating) for warmup[0]
    steps and warming up over warmup[1], then poly decay; gradients clipped to a global norm.

    `freeze_encoder`: the ViT encoder (every `encoder/...` parameter, its final norm included) is never
    trained: it gets no weight gradients and no optimizer state, and only the queries, class head, mask head
    and upscale blocks learn (heads' schedule and clipping as above, over their gradients alone; LLRD and
    warmup[1] then have nothing to act on). The queries still pass through the last encoder blocks, so
    gradients still flow through the encoder's activations. Toggling it changes the optimizer state, so a
    run cannot resume across the switch: start a new workdir from the run's params (`train.init_checkpoint`).

    `decay_query_blocks`: False trains the last L2 encoder blocks (those that see the queries) at the full
    lr, outside the layer-wise decay, as the DINOv3 recipes do (tue-mps/eomt `llrd_l2_enabled: False`)."""
    lr: float = setting(1e-4, "finite and >= 0")
    weight_decay: float = setting(0.05, "finite and >= 0")
    layer_decay: float = setting(0.8, "in [0, 1]")
    warmup: tuple[int, int] = setting((500, 1000), ">= 0")
    clip_norm: float = setting(0.01, "> 0")
    power: float = setting(0.9, ">= 0")
    freeze_encoder: bool = False
    decay_query_blocks: bool = True

    def __post_init__(self):
        check_rules(self)

    def build(self, params: Any, total_steps: int, depth: int, query_blocks: int = 0
              ) -> optax.GradientTransformation:
        """`query_blocks`: L2, the last encoder blocks, which `decay_query_blocks=False` exempts from LLRD."""
        labels = regex_labels(params, [(rf"^{ENCODER}/", "backbone")], "head")
        multipliers = layer_decay(params, depth, self.layer_decay, ENCODER,
                                  undecayed_last=0 if self.decay_query_blocks else query_blocks)
        schedules = {"head": warmup_poly(self.lr, total_steps, self.warmup[0], power=self.power)}
        if not self.freeze_encoder:
            schedules["backbone"] = warmup_poly(self.lr, total_steps, self.warmup[1], frozen_steps=self.warmup[0],
                                                power=self.power)
        return adamw_groups(labels, multipliers, schedules,
                            weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                            frozen=("backbone",) if self.freeze_encoder else ())


@dataclasses.dataclass(frozen=True)
class Annealing:
    """Per-block (starts, ends) of the masked-attention annealing windows; empty: the official T/6 rule
    (`mask_annealing_windows`)."""
    starts: tuple[int, ...] = ()  # a window before step 0 (e.g. (-2,), (-1,)): masking annealed from the start
    ends: tuple[int, ...] = ()
    power: float = setting(0.9, ">= 0")

    def __post_init__(self):
        check_rules(self)


@dataclasses.dataclass
class EomtMethod:
    """`segmentation` picks the targets and the predictors: "semantic" (one mask per class present),
    "panoptic" (one mask per segment, crowd dropped) or "instance" (thing segments only). Categories
    0..num_things-1 are the things."""
    network_class: ClassVar[type] = EoMT
    optimizer_class: ClassVar[type] = EomtOptimizer
    predictors: ClassVar[dict] = PREDICTORS
    metrics: ClassVar[dict] = {"semantic": SemanticMetric, "panoptic": PanopticMetric, "instance": InstanceMetric}
    model: dict
    optimizer: EomtOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    segmentation: str = "panoptic"
    num_things: int = 0
    crop_size: int = setting(640, ">= 1")
    scale_range: tuple[float, float] = setting((0.1, 2.0), "> 0")
    color_jitter: bool = False
    max_segments: int = setting(100, ">= 1")
    set_loss: SetLossConfig = SetLossConfig()
    annealing: Annealing = Annealing()

    def __post_init__(self):
        check_rules(self)
        if self.segmentation not in SEGMENTATIONS:
            raise UserError(f"method.segmentation must be one of {SEGMENTATIONS}, got {self.segmentation!r}")
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        self.label_space = self.data.ground_truth  # EoMT learns the dataset's own labels
        self.num_classes = self.model["num_classes"]
        if not 0 <= self.num_things <= self.num_classes:
            raise UserError(f"method.num_things {self.num_things} must lie in [0, {self.num_classes}]")
        self.is_thing = np.arange(self.num_classes) < self.num_things
        self.num_blocks = self.model["num_query_blocks"]
        if self.annealing.starts or self.annealing.ends:
            self.windows = (list(self.annealing.starts), list(self.annealing.ends))
            if len(self.windows[0]) != self.num_blocks or len(self.windows[1]) != self.num_blocks:
                raise UserError(f"method.annealing needs {self.num_blocks} starts and ends (one per query "
                                f"block), got {self.windows}")
            if max(self.windows[1]) > self.total_steps:
                # Inference runs unmasked: a run that stops inside a window trains a model it never uses.
                raise UserError(f"method.annealing ends {tuple(self.windows[1])} go past train.total_steps "
                                f"{self.total_steps}: set windows that end within the run, or "
                                f"method.annealing.starts=() and ends=() for the T/6 rule")
        else:
            self.windows = mask_annealing_windows(self.total_steps, self.num_blocks)

    def init_params(self, rng: jax.Array) -> Any:
        images = jnp.zeros((1, self.crop_size, self.crop_size, 3))
        return self.network.init({"params": rng, "masking": rng}, images, jnp.ones(self.num_blocks))["params"]

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.total_steps, self.model["encoder"]["depth"],
                                    self.model["num_query_blocks"])

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        masking, dropout, points = jax.random.split(rng, 3)
        probs = mask_annealing_probs(step, *self.windows, power=self.annealing.power)
        if self.optimizer.freeze_encoder:
            # Constants to the gradient, so XLA computes no weight gradients for them; the activations stay
            # differentiable, and the queries' gradients flow back through the blocks they pass.
            params = {**params, ENCODER: jax.lax.stop_gradient(params[ENCODER])}
        out = self.network.apply({"params": params}, batch["image"], probs, train=True,
                                 rngs={"masking": masking, "dropout": dropout})
        targets = Targets(batch["masks"], batch["labels"], batch["valid"])
        loss, terms = set_loss(out["class_logits"], out["mask_logits"], targets, points, self.set_loss)
        # Every prediction layer's terms (layer L2 is the final prediction), not only the last.
        return loss, {f"{name}_{layer}": values[layer] for name, values in terms.items()
                      for layer in range(values.shape[0])}

    def _segments(self, example: dict) -> dict | None:
        """The segment table that gives the training masks, None for per-class masks."""
        if self.segmentation == "semantic":
            return None
        if "segments" not in example:
            raise UserError(f"{self.segmentation} training needs panoptic annotations (ids and a segment "
                            "table); this dataset has semantic labels only: use method.segmentation='semantic'")
        segments = example["segments"]
        if self.segmentation == "instance":
            segments = {k: v[segments["is_thing"]] for k, v in segments.items()}
        return segments

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = mask_example(example)
        segments = self._segments(example)
        example.pop("segments", None)
        if segments is None:
            example.pop("panoptic", None)  # not a target: spare its resizing
        out = eomt_train_example(example, rng, (self.crop_size, self.crop_size), self.scale_range,
                                 color=self.color_jitter, max_segments=self.max_segments, segments=segments)
        return dict(out, image=out["image"].astype(np.float32) / 255)

    def class_counts(self) -> dict:
        """Checked against the training dataset (`DataConfig.check_classes`): an instance model's classes
        are the dataset's thing categories."""
        return dict(label_space=self.label_space, num_classes=self.num_classes,
                    num_things=None if self.segmentation == "semantic" else self.num_things,
                    things_only=self.segmentation == "instance")

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "EoMT predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        metric = choose(self.metrics, kind, "EoMT metric")
        if metric is PanopticMetric:
            return PanopticMetric(self.num_classes, self.is_thing, **settings)
        return metric(self.num_classes, **settings)
