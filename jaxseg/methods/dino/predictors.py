"""DINO's evaluation: on held-out images, the training loss on one fixed pair of global views (the image and
its mirror image: the student's output on each against the teacher's centred, sharpened output on the
other), and the
entropy of the teacher's output (near 0: collapse onto one dimension; near log K: a uniform output)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data.augment.common import normalize_image, resize
from jaxseg.errors import UserError
from jaxseg.losses.dino import dino_loss
from jaxseg.metrics.mean import MeanMetric


class AgreementPredictor:
    """Each image resized to the method's global crop."""
    fixed_shape = True

    def __init__(self, method):
        self.method = method

    def canvas(self, example: dict) -> tuple[int, int]:
        return (self.method.crop_size,) * 2

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        image = resize({"image": np.asarray(example["image"])}, self.canvas(example))["image"]
        return {"image": normalize_image(image)}

    def targets(self, example: dict) -> dict:
        return {}

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        method = self.method
        views = jnp.stack([batch["image"], batch["image"][:, :, ::-1]])  # (2, B, S, S, 3)
        teacher, student = (jax.vmap(lambda v, p=params[name]: method.network.apply({"params": p}, v))(views)
                            for name in ("teacher", "student"))
        temperature = method.teacher_temp
        cross_entropy = jax.vmap(lambda s, t: dino_loss(s[:, None], t[:, None], params["center"], method.student_temp,
                                                        temperature), in_axes=1)(student, teacher)
        probs = jax.nn.softmax((teacher[0] - params["center"]) / temperature, axis=-1)
        entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        ones = jnp.ones_like(entropy)
        return {"cross_entropy_sum": cross_entropy, "cross_entropy_count": ones,
                "teacher_entropy_sum": entropy, "teacher_entropy_count": ones}

    def finish(self, outputs: dict, example: dict) -> dict:
        raise UserError("DINO's agreement predictor writes no per-image predictions; it serves the 'agreement' "
                        "metric")


class AgreementMetric(MeanMetric):
    """The mean over the split of the flip-view cross-entropy ("cross_entropy") and of the teacher's output
    entropy ("teacher_entropy")."""
    names = ("cross_entropy", "teacher_entropy")
