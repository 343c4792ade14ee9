"""Methods as `Task`s for the trainer: model, loss, optimiser recipe and training data of each."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data.pipeline import train_dataset
from jaxseg.data.transforms import eomt_train_example
from jaxseg.inference.mask_classification import instance_predictions, panoptic_segments, semantic_scores
from jaxseg.inference.semantic import mask_classification_score_fn, segment
from jaxseg.inference.whole_image import padded_square_logits
from jaxseg.losses.mask_classification import SetLossConfig, Targets, set_loss
from jaxseg.metrics import confusion_matrix
from jaxseg.metrics.instance import InstanceAccumulator, instance_stats
from jaxseg.metrics.panoptic import panoptic_stats, pq_from_stats
from jaxseg.models.eomt import EoMT
from jaxseg.train.evaluation import defined, semantic_results
from jaxseg.train.optim import eomt_optimizer
from jaxseg.train.schedules import mask_annealing_probs, mask_annealing_windows

SEGMENTATIONS = ("semantic", "panoptic", "instance")
# Decoded segment tables of images without segments come back as float64: the stored dtypes.
_SEGMENT_DTYPES = {"id": np.int32, "category_id": np.int32, "is_thing": bool, "iscrowd": bool,
                   "area": np.int32, "bbox": np.int32}


def mask_example(example: dict) -> dict:
    """A TFDS example of a jaxseg dataset as numpy: the image, (H, W) semantic labels and, where the
    dataset has them, panoptic ids with their segment table."""
    out = {"image": np.asarray(example["image"]), "semantic": np.asarray(example["semantic"])[..., 0]}
    if "panoptic" in example:
        out["panoptic"] = np.asarray(example["panoptic"])
        out["segments"] = {k: np.asarray(example["segments"][k]).astype(dtype)
                           for k, dtype in _SEGMENT_DTYPES.items()}
        out["segments"]["bbox"] = out["segments"]["bbox"].reshape(-1, 4)
    return out


def _segment_id_map(panoptic: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Dataset segment ids (e.g. COCO's RGB-encoded ones) -> slot + 1 of each segment, 0 elsewhere."""
    slots = np.zeros(panoptic.shape, np.int32)
    for slot, segment_id in enumerate(ids):
        slots[panoptic == segment_id] = slot + 1
    return slots


@dataclasses.dataclass
class EomtTask:
    """EoMT with its recipe: masked-attention annealing over the run, the set loss on all L2 + 1
    predictions, AdamW with LLRD and the two-stage warm-up. `segmentation` picks the targets, the
    evaluation and the predictions: "semantic" (one mask per class present; mIoU of sliding-window
    inference), "panoptic" (one mask per segment, crowd dropped; PQ and the mIoU of the same forward)
    or "instance" (thing segments only; COCO mask AP). Categories 0..num_things-1 are the things."""
    model: dict
    source: Sequence[dict] | None
    total_steps: int
    batch_size: int
    crop_size: int
    segmentation: str = "panoptic"
    num_things: int = 0
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

    def __post_init__(self):
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {self.segmentation!r}")
        self.network = EoMT(**self.model)
        self.num_classes = self.model["num_classes"]
        if not 0 <= self.num_things <= self.num_classes:
            raise ValueError(f"num_things {self.num_things} must lie in [0, {self.num_classes}]")
        self.is_thing = np.arange(self.num_classes) < self.num_things
        self.num_blocks = self.model["num_query_blocks"]
        self.windows = self.annealing_windows or mask_annealing_windows(self.total_steps, self.num_blocks)
        # Params are arguments, not constants baked into the programs; one compilation per image size.
        self._whole_image = jax.jit(self._whole_image_outputs)
        self._semantic = jax.jit(self._sliding_window_semantic)

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

    def _segments(self, example: dict) -> dict | None:
        """The segment table that gives the training masks, None for per-class masks."""
        if self.segmentation == "semantic":
            return None
        if "segments" not in example:
            raise ValueError(f"{self.segmentation} training needs panoptic annotations (ids and a segment "
                             "table); this dataset has semantic labels only: use segmentation='semantic'")
        segments = example["segments"]
        if self.segmentation == "instance":
            segments = {k: v[segments["is_thing"]] for k, v in segments.items()}
        return segments

    def transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = mask_example(example)
        segments = self._segments(example)
        example.pop("segments", None)
        if segments is None:
            example.pop("panoptic", None)  # not a target: spare its resizing
        out = eomt_train_example(example, rng, (self.crop_size, self.crop_size), self.scale_range,
                                 color=self.color_jitter, max_segments=self.max_segments, segments=segments)
        return dict(out, image=out["image"].astype(np.float32) / 255)

    def train_data(self, seed: int):
        return iter(train_dataset(self.source, self.transform, seed=seed, batch_size=self.batch_size))

    def _final_logits(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The final prediction (masking off) of (n, crop, crop, 3) images in [0, 1]."""
        out = self.network.apply({"params": params}, images)
        return out["class_logits"][-1], out["mask_logits"][-1]

    def _sliding_window_semantic(self, params: Any, image: jax.Array) -> jax.Array:
        score_fn = mask_classification_score_fn(lambda windows: self._final_logits(params, windows))
        return segment(score_fn, image, self.crop_size)

    def _whole_image_outputs(self, params: Any, image: jax.Array) -> dict:
        class_logits, mask_logits = padded_square_logits(
            lambda images: self._final_logits(params, images), image, self.crop_size)
        semantic = jnp.argmax(semantic_scores(class_logits, mask_logits), axis=0).astype(jnp.int32)
        if self.segmentation == "instance":
            masks, classes, scores = instance_predictions(class_logits, mask_logits)
            return {"semantic": semantic, "instances": {"masks": masks, "classes": classes, "scores": scores}}
        ids, categories = panoptic_segments(class_logits, mask_logits, self.is_thing)
        scores = jax.nn.softmax(class_logits, axis=-1).max(-1)
        return {"semantic": semantic, "panoptic": ids, "segment_categories": categories,
                "segment_scores": scores}

    def infer(self, params: Any, image: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Predictions for one (H, W, 3) uint8 image at its size: "semantic" (H, W) class map; with
        panoptic segmentation also "panoptic" (H, W) segment ids (0 = void) and "segments"
        [{"id", "category_id", "is_thing", "score"}]; with instance segmentation "instances" {"masks"
        (N, H, W), "classes", "scores"} (top 100, unthresholded). `labels` is unused (no image-level
        labels at inference)."""
        del labels
        out = self._outputs(params, image)
        if self.segmentation != "panoptic":
            return out
        categories, scores = out.pop("segment_categories"), out.pop("segment_scores")
        out["segments"] = [{"id": int(i), "category_id": int(categories[i]),
                            "is_thing": bool(self.is_thing[categories[i]]), "score": float(scores[i - 1])}
                           for i in np.unique(out["panoptic"]) if i > 0]
        return out

    def _outputs(self, params: Any, image: np.ndarray) -> dict:
        image = jnp.asarray(image, jnp.float32) / 255
        if self.segmentation == "semantic":
            return {"semantic": np.asarray(self._semantic(params, image))}
        return jax.device_get(self._whole_image(params, image))

    def evaluate(self, params: Any, mesh: jax.sharding.Mesh, rules) -> dict:
        """Metrics of `segmentation` over `eval_source` (skipped without one): mIoU (semantic, panoptic),
        PQ (panoptic), mask AP (instance). Every host runs every image (the images differ in size, so
        they are not batched), in step, as sharded params need all hosts."""
        if self.eval_source is None:
            return {}
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        pq_sums = {key: 0 for key in ("iou_sum", "tp", "fp", "fn")}
        instances = InstanceAccumulator(self.num_classes)
        for index in range(len(self.eval_source)):
            example = mask_example(self.eval_source[index])
            out = self._outputs(params, example["image"])
            if self.segmentation != "instance":
                confusion += np.asarray(confusion_matrix(example["semantic"], out["semantic"], self.num_classes))
            if self.segmentation == "panoptic":
                segments, predicted = example["segments"], out["segment_categories"][1:]
                stats = panoptic_stats(out["panoptic"], np.maximum(predicted, 0),
                                       _segment_id_map(example["panoptic"], segments["id"]),
                                       segments["category_id"], segments["iscrowd"], self.num_classes,
                                       pred_valid=predicted >= 0)
                pq_sums = {key: pq_sums[key] + np.asarray(stats[key], np.float64) for key in pq_sums}
            if self.segmentation == "instance":
                things = {k: v[example["segments"]["is_thing"]] for k, v in example["segments"].items()}
                gt_masks = example["panoptic"][None] == things["id"][:, None, None]
                predictions = out["instances"]
                instances.update(instance_stats(predictions["masks"], predictions["classes"],
                                                predictions["scores"], gt_masks, things["category_id"],
                                                things["iscrowd"]))
        results = {"examples": len(self.eval_source)}
        if self.segmentation != "instance":
            results.update(semantic_results(confusion))
        if self.segmentation == "panoptic":
            pq = pq_from_stats(pq_sums, self.is_thing)
            results.update({f"{key}{suffix}": defined(pq[group][key]) for group, suffix in
                            (("all", ""), ("things", "_things"), ("stuff", "_stuff")) for key in ("PQ", "SQ", "RQ")})
        if self.segmentation == "instance":
            ap = instances.evaluate()
            results.update({key: float(ap[key]) for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
        return results
