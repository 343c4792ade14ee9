"""DINO's self-distillation loss (facebookresearch/dino `main_dino.py` `DINOLoss`), pure: the cross-entropy
between the teacher's centred, sharpened softmax over its global views and the student's softmax over every
other view, averaged over the (teacher view, student view) pairs; and the EMA of the centre."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float,
              teacher_temp: float | jax.Array) -> jax.Array:
    """student (V, B, K) head outputs of V views (the first two the global ones the teacher saw), teacher
    (2, B, K), center (K,) -> the mean over pairs v != t of the batch-mean cross-entropy
    -sum_k softmax((teacher_t - center) / teacher_temp)_k log softmax(student_v / student_temp)_k."""
    targets = jax.lax.stop_gradient(jax.nn.softmax((teacher - center) / teacher_temp, axis=-1))
    log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)
    cross = -jnp.einsum("tbk,vbk->tv", targets, log_probs) / student.shape[1]  # (2, V) batch means
    pairs = 1.0 - jnp.eye(teacher.shape[0], student.shape[0])  # a view is never its own target
    return (cross * pairs).sum() / pairs.sum()


def updated_center(center: jax.Array, teacher: jax.Array, momentum: float) -> jax.Array:
    """DINO's `update_center`: momentum * center + (1 - momentum) * the mean teacher output of the batch."""
    batch_center = teacher.reshape(-1, teacher.shape[-1]).mean(axis=0)
    return momentum * center + (1 - momentum) * batch_center
