"""What a method provides: the `Method` protocol the trainer knows and the `Predictor` protocol the
evaluator knows. A method is one package under `jaxseg/methods/` plus configs; the trainer, the evaluator
and the tools do not change for it."""
from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np
import optax

from jaxseg.config import check_divisible
from jaxseg.errors import UserError
from jaxseg.metrics.accumulators import Metric
from jaxseg.models.vit import ViT


class Predictor(Protocol):
    # True: `prepare` gives every image the same array shapes (padded to a canvas), so the evaluator runs
    # global batches over the whole mesh; False: shapes follow the image (per-host batches of one shape).
    fixed_shape: bool

    def canvas(self, example: dict) -> tuple[int, int]:
        """(H, W) of the prediction maps `predict` returns for this example (the metrics' targets are
        padded to it)."""

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        """Host side: one dataset example (or {"image": uint8 (H, W, 3)}) -> its input arrays."""

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Traced inside jit: a batch of prepared inputs -> outputs with a leading batch axis (the
        metrics read "semantic", "panoptic", "instances", "cams", ... at the canvas size)."""

    def targets(self, example: dict) -> dict:
        """Host side: the example's ground truth as a metric target dict (`jaxseg.metrics.accumulators`)."""

    def finish(self, outputs: dict[str, np.ndarray], example: dict) -> dict:
        """Host side: one image's outputs -> its prediction at the image's own size ("semantic" (H, W), and
        per method "panoptic" + "segments", "instances", "cams" + "cam_classes")."""


class Method(Protocol):
    # The label space (`jaxseg.data.datasets.LABEL_SPACES`) of the class ids the predictions hold.
    label_space: str

    def init_params(self, rng: jax.Array) -> Any:
        """Parameters (may carry logical-axis boxes) from an rng; traced under `jax.eval_shape`."""

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        """The recipe's optimiser (the method's `optimizer` section) for these (unboxed) parameters."""

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, {name: scalar or array metric}) of one global batch; traced inside jit."""

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        """One training example -> its augmented arrays (static shapes), drawing from `rng` only."""

    def class_counts(self) -> dict | None:
        """The classes the model predicts, as `DataConfig.check_classes` takes them (`label_space`,
        `num_classes`, `num_things`), checked against the training dataset before training; None: any
        dataset fits (no classes are learned)."""

    def predictor(self, kind: str, **settings) -> Predictor:
        """The predictor `kind` (e.g. "panoptic", "cams") with its settings (a config's
        `evals.<name>.predictor` section)."""

    def metric(self, kind: str, **settings) -> Metric:
        """A fresh accumulator of metric `kind` (e.g. "semantic", "panoptic", "cam_sweep")."""


def choose(kinds: dict, kind: str, what: str):
    """`kinds[kind]`, or an error naming `what` (e.g. "EoMT predictor") and the valid kinds."""
    if kind not in kinds:
        raise UserError(f"{what} {kind!r} is not available; valid: {sorted(kinds)}")
    return kinds[kind]


def check_crop_fits_patches(crop_size: int, model: dict) -> None:
    """A training crop is a whole number of the encoder's patches (the patch grid would drop the rest)."""
    patch = model["encoder"].get("patch_size", ViT.patch_size)
    check_divisible("method.crop_size", crop_size, patch, f"the model's patch size {patch}")
