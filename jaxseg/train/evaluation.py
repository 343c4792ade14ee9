"""Dataset-level evaluation inside a (possibly multi-host) run: each host reads its share of the split
through `eval_dataset` (padded batches carry `_valid = False`), batches become global arrays, and the
per-batch statistics are summed on device into a replicated result, so every host gets the same totals
and padding never counts."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxseg.data.pipeline import VALID_KEY, eval_dataset, global_batch
from jaxseg.metrics import confusion_matrix, miou_from_confusion
from jaxseg.train.sharding import DEFAULT_RULES

# (params, images (B, H, W, 3) float) -> (B, H, W) integer class map
SemanticPredictFn = Callable[[Any, jax.Array], jax.Array]


def evaluate_semantic(predict: SemanticPredictFn, params: Any, source: Sequence[dict],
                      transform: Callable[[dict], dict], num_classes: int, *, batch_size: int,
                      mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> dict:
    """mIoU (label 255 ignored) over every example of `source`; `transform` maps an example to
    {"image": float (H, W, 3), "semantic": (H, W) int}."""
    @jax.jit
    def batch_confusion(params, batch):
        predictions = predict(params, batch["image"])
        counts = confusion_matrix(batch["semantic"], predictions, num_classes, weights=batch[VALID_KEY])
        return jax.lax.with_sharding_constraint(counts, NamedSharding(mesh, PartitionSpec()))

    confusion = np.zeros((num_classes, num_classes), np.int64)
    for local in eval_dataset(source, transform, batch_size=batch_size):
        batch = global_batch({k: local[k] for k in ("image", "semantic", VALID_KEY)}, mesh, rules)
        confusion += np.asarray(batch_confusion(params, batch), np.int64)
    result = miou_from_confusion(confusion)
    return {"mean_iou": float(result["mean_iou"]), "pixel_accuracy": float(result["pixel_accuracy"]),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in result["per_class_iou"]],
            "examples": len(source)}
