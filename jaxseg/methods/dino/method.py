"""DINO pretraining (facebookresearch/dino `main_dino.py`): multi-crop views (two global crops, area
`global_scale`, and `num_local_crops` small ones, area `local_scale`) with flips, colour jitter and
grayscale; the student sees every view, the teacher (an EMA of the student, momentum rising to 1 on a
cosine) the global ones; the loss is `jaxseg.losses.dino.dino_loss` with the teacher's output centred by an
EMA of its batch means. AdamW (no weight decay on biases and 1-D parameters) with per-parameter gradient
clipping, linear warm-up and cosine decay.

The trainer updates parameters only through the optimizer, so the teacher and the centre are parameters
(`params = {"student", "teacher", "center"}`) moved by `DinoOptimizer`'s transformation: the teacher by
its EMA of the updated student, the centre by minus its gradient, which the loss makes (centre - its EMA
target) through a term that adds 0 to the loss value.

Departures from the official recipe, for small CPU runs: no Gaussian blur or solarisation (they wipe out
the generated scenes' fine textures at 64 px), colour jitter as `jaxseg.data.augment.eomt.color_jitter`
draws it (each operation with probability 0.8), a constant weight decay, the last layer trained from the
start.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.common import normalize_image, random_hflip
from jaxseg.data.augment.eomt import color_jitter, grayscale
from jaxseg.data.augment.timm import random_resized_crop
from jaxseg.data.datasets import DataConfig
from jaxseg.losses.dino import dino_loss, updated_center
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.dino.predictors import AgreementMetric, AgreementPredictor
from jaxseg.models.dino import DINO
from jaxseg.train.optim import decays_weights_only, warmup_cosine


def _clip_each(max_norm: float) -> optax.GradientTransformation:
    """DINO's `clip_gradients`: each parameter's gradient rescaled to norm at most `max_norm`."""
    def clip(g, _):
        return g * jnp.minimum(1.0, max_norm / (jnp.linalg.norm(g.reshape(-1)) + 1e-6))
    return optax.stateless_with_tree_map(clip)


def _self_distillation(student_tx: optax.GradientTransformation, momentum) -> optax.GradientTransformation:
    """The student trained by `student_tx`; the teacher moved to momentum * teacher + (1 - momentum) *
    (updated student); the centre moved by minus its gradient."""
    def init(params):
        return student_tx.init(params["student"]), jnp.zeros([], jnp.int32)

    def update(grads, state, params):
        student_state, count = state
        student, student_state = student_tx.update(grads["student"], student_state, params["student"])
        rate = 1.0 - momentum(count)
        teacher = jax.tree_util.tree_map(lambda t, s, u: rate * (s + u - t), params["teacher"], params["student"],
                                         student)
        updates = {"student": student, "teacher": teacher, "center": -grads["center"]}
        return updates, (student_state, optax.safe_increment(count))
    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class DinoOptimizer:
    """DINO's recipe (a config's `optimizer` section): AdamW on the student (weight decay on weight matrices
    and tokens only), each gradient clipped to norm `clip_norm`, lr warmed up linearly over the first
    `warmup` share of the steps then a cosine to `min_lr`; the teacher's EMA momentum rises from
    `teacher_momentum` to 1 on a cosine."""
    lr: float = setting(5e-4, "finite and >= 0")
    min_lr: float = setting(1e-6, "finite and >= 0")
    warmup: float = setting(0.1, "in [0, 1]")
    weight_decay: float = setting(0.04, "finite and >= 0")
    clip_norm: float = setting(3.0, "> 0")
    teacher_momentum: float = setting(0.996, "in [0, 1]")

    def __post_init__(self):
        check_rules(self)

    def build(self, params: Any, total_steps: int) -> optax.GradientTransformation:
        total_steps = max(total_steps, 1)
        schedule = warmup_cosine(self.lr, self.min_lr, self.warmup, total_steps)
        student_tx = optax.chain(_clip_each(self.clip_norm), optax.adamw(
            schedule, weight_decay=self.weight_decay, mask=decays_weights_only(params["student"])))

        def momentum(step):
            return 1.0 - (1.0 - self.teacher_momentum) * (jnp.cos(jnp.pi * step / total_steps) + 1) / 2
        return _self_distillation(student_tx, momentum)


@dataclasses.dataclass
class DinoMethod:
    """`crop_size` / `local_crop_size`: the global and local views (whole numbers of patches);
    `student_temp`, `teacher_temp`: the softmax temperatures (the teacher's rises linearly from
    `warmup_teacher_temp` over the first `teacher_temp_warmup` share of the steps); `center_momentum`: the
    EMA of the centre."""
    network_class: ClassVar[type] = DINO
    # Where its params hold the pretrained encoder (`jaxseg.train.pretrained` exports that subtree): the
    # teacher, as DINO evaluates.
    encoder_subtree: ClassVar[str] = "teacher/encoder"
    label_space: ClassVar[str] = "categories"  # nothing is predicted per class
    optimizer_class: ClassVar[type] = DinoOptimizer
    predictors: ClassVar[dict] = {"agreement": AgreementPredictor}
    metrics: ClassVar[dict] = {"agreement": AgreementMetric}
    model: dict
    optimizer: DinoOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    crop_size: int = setting(224, ">= 1")
    local_crop_size: int = setting(96, ">= 1")
    num_local_crops: int = setting(8, ">= 0")
    global_scale: tuple[float, float] = setting((0.4, 1.0), "in [0, 1]")
    local_scale: tuple[float, float] = setting((0.05, 0.4), "in [0, 1]")
    student_temp: float = setting(0.1, "> 0")
    teacher_temp: float = setting(0.04, "> 0")
    warmup_teacher_temp: float = setting(0.04, "> 0")
    teacher_temp_warmup: float = setting(0.0, "in [0, 1]")
    center_momentum: float = setting(0.9, "in [0, 1]")
    grayscale: float = setting(0.2, "in [0, 1]")

    def __post_init__(self):
        check_rules(self)
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        check_crop_fits_patches(self.crop_size, self.model)
        check_crop_fits_patches(self.local_crop_size, self.model)

    def init_params(self, rng: jax.Array) -> Any:
        student = self.network.init({"params": rng}, jnp.zeros((1, self.crop_size, self.crop_size, 3)))["params"]
        return {"student": student, "teacher": student, "center": jnp.zeros((self.network.out_dim,))}

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.total_steps)

    def teacher_temperature(self, step: jax.Array) -> jax.Array:
        warmup = self.teacher_temp_warmup * self.total_steps
        ramp = self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / max(warmup, 1)
        return jnp.where(step < warmup, ramp, self.teacher_temp)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        globals_ = batch["global"]  # (B, 2, S, S, 3)
        batch_size = globals_.shape[0]

        def views(images):  # (B, V, ...) -> (V * B, ...), view-major
            return jnp.swapaxes(images, 0, 1).reshape((-1,) + images.shape[2:])

        def student(images, key):
            out = self.network.apply({"params": params["student"]}, views(images), train=True, rngs={"dropout": key})
            return out.reshape(images.shape[1], batch_size, -1)

        global_rng, local_rng = jax.random.split(rng)
        outputs = [student(globals_, global_rng)]
        if self.num_local_crops:
            outputs.append(student(batch["local"], local_rng))
        teacher = self.network.apply({"params": jax.lax.stop_gradient(params["teacher"])}, views(globals_))
        teacher = jax.lax.stop_gradient(teacher.reshape(2, batch_size, -1))
        center = params["center"]
        cross_entropy = dino_loss(jnp.concatenate(outputs), teacher, jax.lax.stop_gradient(center), self.student_temp,
                                  self.teacher_temperature(step))
        # Its gradient (centre - target) is the centre's step (DinoOptimizer); its value is taken out again.
        target = updated_center(jax.lax.stop_gradient(center), teacher, self.center_momentum)
        pull = 0.5 * jnp.sum(jnp.square(center - target))
        probs = jax.nn.softmax((teacher - center) / self.teacher_temperature(step), axis=-1)
        entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1).mean()
        return cross_entropy + pull - jax.lax.stop_gradient(pull), {"cross_entropy": cross_entropy,
                                                                   "teacher_entropy": entropy}

    def _view(self, image: np.ndarray, size: int, scale, rng: np.random.Generator) -> np.ndarray:
        view = random_hflip(random_resized_crop({"image": image}, rng, (size, size), scale=scale), rng)
        view = color_jitter(view, rng, brightness_delta=0.4, contrast=(0.6, 1.4), saturation=(0.6, 1.4),
                            hue_delta=0.1, p=0.8)["image"]
        if rng.random() < self.grayscale:
            view = np.repeat(np.round(grayscale(view.astype(np.float64)))[..., None], 3, axis=-1).astype(np.uint8)
        return normalize_image(view)

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(example["image"])
        out = {"global": np.stack([self._view(image, self.crop_size, self.global_scale, rng) for _ in range(2)])}
        if self.num_local_crops:
            out["local"] = np.stack([self._view(image, self.local_crop_size, self.local_scale, rng)
                                     for _ in range(self.num_local_crops)])
        return out

    def class_counts(self) -> None:
        """No classes are learned: any dataset fits."""
        return None

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "DINO predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "DINO metric")(**settings)

