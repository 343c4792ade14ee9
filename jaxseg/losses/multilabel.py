"""Image-level (multi-label) classification losses for weakly supervised segmentation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxseg.errors import UserError

Array = jax.Array


def multilabel_soft_margin(logits: Array, labels: Array) -> Array:
    """PyTorch's `MultiLabelSoftMarginLoss`: BCE-with-logits averaged over classes, then over the batch.
    logits (B, C), labels (B, C) multi-hot."""
    if logits.shape != labels.shape:
        raise UserError(f"logits {logits.shape} and labels {labels.shape} must have the same shape")
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                              labels.astype(jnp.float32)).mean()


def cam_loss(outputs: dict[str, Array], labels: Array) -> tuple[Array, dict[str, Array]]:
    """WeakTr / MCTformer stage-1 loss: the sum, with equal weights, of the soft-margin losses of the
    class-token, coarse-CAM and (WeakTr only) fine-CAM logits. Returns (total, terms)."""
    terms = {name: multilabel_soft_margin(outputs[f"{name}_logits"], labels)
             for name in ("cls", "coarse", "fine") if f"{name}_logits" in outputs}
    return sum(terms.values()), terms


def soft_target_cross_entropy(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy against the labels scaled to sum to 1, averaged over the images that have a
    label: PyTorch's `CrossEntropyLoss` for one-hot labels (single-label classification, Prompt-CAM's loss);
    an image with k labels takes each at 1/k. logits (B, C), labels (B, C) multi-hot."""
    if logits.shape != labels.shape:
        raise UserError(f"logits {logits.shape} and labels {labels.shape} must have the same shape")
    labels = labels.astype(jnp.float32)
    count = labels.sum(-1)
    targets = labels / jnp.maximum(count, 1.0)[:, None]
    per_image = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    labelled = (count > 0).astype(jnp.float32)
    return (per_image * labelled).sum() / jnp.maximum(labelled.sum(), 1.0)
