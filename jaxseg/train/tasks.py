"""Methods as `Task`s for the trainer: model, loss, optimiser recipe and training data of each."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data.pipeline import train_dataset
from jaxseg.data.transforms import eomt_train_example
from jaxseg.inference.mask_classification import semantic_scores
from jaxseg.losses.mask_classification import SetLossConfig, Targets, set_loss
from jaxseg.models.eomt import EoMT
from jaxseg.ops.resize import resize
from jaxseg.train.evaluation import evaluate_semantic
from jaxseg.train.optim import eomt_optimizer
from jaxseg.train.schedules import mask_annealing_probs, mask_annealing_windows


def scenes_example(example: dict) -> dict:
    """A `jaxseg_scenes` TFDS example in the form the transforms take: (H, W) semantic labels and the
    segment table as arrays."""
    return {"image": np.asarray(example["image"]), "semantic": np.asarray(example["semantic"])[..., 0],
            "panoptic": np.asarray(example["panoptic"]),
            "segments": {k: np.asarray(v) for k, v in example["segments"].items()}}


@dataclasses.dataclass
class EomtTask:
    """EoMT on mask-classification targets (panoptic segments) with its recipe: masked-attention
    annealing over the run, the set loss on all L2 + 1 predictions, AdamW with LLRD and the two-stage
    warm-up."""
    model: dict
    source: Sequence[dict]
    total_steps: int
    batch_size: int
    crop_size: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    color_jitter: bool = False
    max_segments: int = 32
    lr: float = 1e-4
    warmup: tuple[int, int] = (500, 1000)
    layer_decay: float = 0.8
    clip_norm: float = 0.01
    loss_config: SetLossConfig = SetLossConfig()
    # Explicit (starts, ends) of the per-block annealing windows; default: the official T/6 rule.
    annealing_windows: tuple | None = None
    eval_source: Sequence[dict] | None = None
    eval_batch_size: int = 8

    def __post_init__(self):
        self.network = EoMT(**self.model)
        self.num_blocks = self.model["num_query_blocks"]
        self.windows = self.annealing_windows or mask_annealing_windows(self.total_steps, self.num_blocks)

    def init_params(self, rng: jax.Array) -> Any:
        images = jnp.zeros((1, self.crop_size, self.crop_size, 3))
        return self.network.init({"params": rng, "masking": rng}, images, jnp.ones(self.num_blocks))["params"]

    def optimizer(self, params: Any):
        return eomt_optimizer(params, total_steps=self.total_steps, depth=self.model["encoder"]["depth"],
                              lr=self.lr, warmup=self.warmup, layer_decay_rate=self.layer_decay,
                              clip_norm=self.clip_norm)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        masking, dropout, points = jax.random.split(rng, 3)
        probs = mask_annealing_probs(step, *self.windows)
        out = self.network.apply({"params": params}, batch["image"], probs, train=True,
                                 rngs={"masking": masking, "dropout": dropout})
        targets = Targets(batch["masks"], batch["labels"], batch["valid"])
        loss, terms = set_loss(out["class_logits"], out["mask_logits"], targets, points, self.loss_config)
        return loss, {f"{name}_last": values[-1] for name, values in terms.items()}

    def transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = scenes_example(example)
        segments = example.pop("segments")
        out = eomt_train_example(example, rng, (self.crop_size, self.crop_size), self.scale_range,
                                 color=self.color_jitter, max_segments=self.max_segments, segments=segments)
        return dict(out, image=out["image"].astype(np.float32) / 255)

    def train_data(self, seed: int):
        return iter(train_dataset(self.source, self.transform, seed=seed, batch_size=self.batch_size))

    def predict_semantic(self, params: Any, images: jax.Array) -> jax.Array:
        """(B, H, W) class map of crop-sized images from the final prediction (masking off)."""
        out = self.network.apply({"params": params}, images)
        mask_logits = resize(out["mask_logits"][-1], images.shape[1:3], axes=(-2, -1))
        scores = jax.vmap(semantic_scores)(out["class_logits"][-1], mask_logits)
        return jnp.argmax(scores, axis=1)

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh, rules) -> dict:
        """Semantic mIoU on `eval_source` (skipped without one)."""
        if self.eval_source is None:
            return {}
        return evaluate_semantic(self.predict_semantic, params, self.eval_source, _scenes_eval_example,
                                 self.model["num_classes"], batch_size=self.eval_batch_size, mesh=mesh,
                                 rules=rules)


def _scenes_eval_example(example: dict) -> dict:
    example = scenes_example(example)
    return {"image": example["image"].astype(np.float32) / 255, "semantic": example["semantic"]}

