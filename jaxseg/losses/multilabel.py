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
