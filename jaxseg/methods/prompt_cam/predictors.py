"""Prompt-CAM's predictor: trait maps as CAMs and per head.

"cams": the head mean of each class prompt's trait map, through the WSSS CAM pass of WeakTr
(`jaxseg.wsss.cam`: each image at its own size and at `scales`, plain and flipped, upsampled, summed,
min-max normalised per present class), and the pseudo-label map at `threshold`, so that the CAM sweep
(`cam_sweep`) scores them as it scores WeakTr's. "trait_maps": the per-head maps of one plain pass at the
image's size, (C, heads, h, w) on the patch grid, which the attention-mass metric (`attention_mass`) reads;
`finish` turns those of the present classes into (K, heads, H, W) maps in [0, 1] at the image's size for
the prediction writer (`jaxseg.visualize.PredictionWriter` draws one picture per class and head).

`source="class_token"` reads the backbone alone instead of the prompts: its own class tokens' last-block
attention (one class token per class, as WeakTr's encoder: token c for class c; a single class token: the
same map for every class), the reference the trait maps are measured against.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.methods.weaktr.predictors import PSEUDO_LABEL_THRESHOLD
from jaxseg.metrics.attention_mass import patch_fractions
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD, PIXEL_STATS, normalize
from jaxseg.ops.resize import resize
from jaxseg.wsss.cam import image_cams, pseudo_label, view_sizes, wsss_semantic

LABEL_SOURCES = ("given", "predicted")
MAP_SOURCES = ("prompts", "class_token")


class TraitMapPredictor:
    """`scales` of the CAM passes, `threshold` of the pseudo-label map, `labels`: "given" (the example's
    image-level labels, cut to the C classes) or "predicted" (the classes the model predicts:
    sigmoid > 0.5 of each score for the multi-label loss, the best score for the single-label one),
    `source`: "prompts" (the trait maps) or "class_token" (the backbone's class-token attention)."""
    fixed_shape = False

    def __init__(self, method, scales: Sequence[float] = (1.0,), threshold: float = PSEUDO_LABEL_THRESHOLD,
                 labels: str = "given", source: str = "prompts"):
        if labels not in LABEL_SOURCES:
            raise UserError(f"the Prompt-CAM predictor's labels must be one of {LABEL_SOURCES}, got {labels!r}")
        if source not in MAP_SOURCES:
            raise UserError(f"the Prompt-CAM predictor's source must be one of {MAP_SOURCES}, got {source!r}")
        if not 0 <= threshold <= 1:
            raise UserError(f"the Prompt-CAM predictor's threshold must lie in [0, 1], got {threshold}")
        self.method, self.network, self.num_classes = method, method.network, method.num_classes
        self.scales, self.threshold, self.labels, self.source = tuple(scales), threshold, labels, source
        self.patch = method.patch_size
        self.pixel_stats = PIXEL_STATS[method.pixel_stats]
        if source == "class_token":
            tokens = method.model["encoder"].get("num_cls_tokens", 1)
            if tokens not in (1, self.num_classes):
                raise UserError(f"source='class_token' needs one class token or one per class "
                                f"({self.num_classes}); the encoder has {tokens}")

    def canvas(self, example: dict) -> tuple[int, int]:
        return tuple(np.asarray(example["image"]).shape[:2])

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        view_sizes(image.shape[:2], self.scales + (1.0,), self.patch)
        if self.labels == "predicted":
            return {"image": image}
        if "labels" not in example:
            raise UserError("the Prompt-CAM predictor takes the images' labels (labels='given'), and this "
                            "example has none: use labels='predicted'")
        return {"image": image, "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def targets(self, example: dict) -> dict:
        semantic = wsss_semantic(example, self.num_classes, self.method.data.ground_truth)
        fractions, valid = patch_fractions(semantic, self.num_classes, self.patch)
        return {"semantic": semantic, "labels": np.asarray(example["labels"][:self.num_classes], np.float32),
                "fractions": fractions, "valid": valid}

    def _maps(self, params: Any, images: jax.Array) -> jax.Array:
        """(B, C, heads, h, w) maps of normalised images (B, H, W, 3)."""
        variables = {"params": params}
        if self.source == "prompts":
            return self.network.apply(variables, images, trait_maps=True)["trait_maps"]
        maps = self.network.apply(variables, images, method=self.network.class_token_maps)
        return jnp.broadcast_to(maps, (maps.shape[0], self.num_classes) + maps.shape[2:])

    def _input(self, image: jax.Array) -> jax.Array:
        return normalize(image.astype(jnp.float32) / 255, *self.pixel_stats)

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        def cam_fn(views):
            if self.method.pixel_stats != "imagenet":  # the CAM pass normalises its views for ImageNet
                pixels = views * jnp.asarray(IMAGENET_STD, views.dtype) + jnp.asarray(IMAGENET_MEAN, views.dtype)
                views = normalize(pixels, *self.pixel_stats)
            return self._maps(params, views).mean(2), None

        def one(image, labels):
            view = self._input(image)[None]
            if labels is None:
                logits = self.network.apply({"params": params}, view)["logits"][0]
                labels = self.method.predicted_labels(logits)
            cams = image_cams(cam_fn, image, labels, self.patch, self.scales)
            return {"cams": cams, "present": labels, "semantic": pseudo_label(cams, labels, self.threshold),
                    "trait_maps": self._maps(params, view)[0]}
        return jax.vmap(one)(batch["image"], batch.get("labels"))

    def finish(self, outputs: dict, example: dict) -> dict:
        present = np.flatnonzero(outputs["present"])
        height, width = np.asarray(example["image"]).shape[:2]
        maps = np.asarray(outputs["trait_maps"])[present]  # (K, heads, h, w)
        rows, cols = maps.shape[-2:]
        if len(present):  # bilinear onto the whole patches, the pixels beyond them 0
            maps = np.asarray(resize(maps, (rows * self.patch, cols * self.patch), method="bilinear", axes=(-2, -1)))
        maps = np.pad(maps, ((0, 0), (0, 0), (0, height - maps.shape[-2]), (0, width - maps.shape[-1])))
        low, high = maps.min((2, 3), keepdims=True), maps.max((2, 3), keepdims=True)
        return {"semantic": outputs["semantic"], "cams": outputs["cams"], "cam_classes": present,
                "trait_maps": np.clip((maps - low) / np.maximum(high - low, 1e-12), 0, 1)}
