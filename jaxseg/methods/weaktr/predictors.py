"""WeakTr's CAM predictor: multi-scale + flip CAMs of each image at its own size, as the official engine
(`jaxseg.wsss.cam`), of one of the three kinds of the original's `attention_type`
(`jaxseg.models.weaktr.select_cam`) or GETAM's gradient-weighted attention (`jaxseg.wsss.gradient_attention`),
refined by the patch attention or not, min-max normalised per present class, optionally refined by PAR
over the image's colours (`jaxseg.wsss.par`, AFA's) and normalised again, and the pseudo-label map at a
background threshold. The model's input follows the image size, so images are batched with others of their
shape (the evaluator's own-shape mode)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.models.vit import ViT
from jaxseg.models.weaktr import CAM_KINDS, select_cam
from jaxseg.ops.image import normalize
from jaxseg.wsss.cam import image_cams, normalize_cams, pseudo_label, view_sizes, wsss_semantic
from jaxseg.wsss.gradient_attention import gradient_attention
from jaxseg.wsss.par import par

# Background threshold of the pseudo-labels where a run has not measured a better one (WeakTr's for VOC).
PSEUDO_LABEL_THRESHOLD = 0.43
LABEL_SOURCES = ("given", "predicted")
# The model's CAM kinds and GETAM's gradient-weighted attention of each class token over the patches.
PREDICTOR_CAM_KINDS = CAM_KINDS + ("gradient_attention",)
GRADIENT_SCORES = ("cls", "coarse")


class CamPredictor:
    """`scales` of the passes, `cam_kind` ("fused": WeakTr's fused CAM, "patchcam": the conv head's CAM,
    "cross": the cross attention alone, "gradient_attention": GETAM's map of each class token's row),
    `refine` by the patch attention (R = PA . M), `threshold` of the label map, `labels`: "given" (the
    example's image-level labels, cut to the C classes) or "predicted" (the classes whose mean sigmoid of
    the class-token and coarse-CAM logits on the image exceeds 0.5). For "gradient_attention":
    `gradient_score`, the logits differentiated ("cls": the class tokens', "coarse": the conv head's), and
    `gradient_start_layer`, the first block summed (None: half the depth, GETAM's 6 of 12). `par`: the
    normalised CAMs refined by PAR at its official settings, then normalised again."""
    fixed_shape = False

    def __init__(self, network, num_classes: int, label_space: str,
                 scales: Sequence[float] = (1.0, 1.2), cam_kind: str = "fused", refine: bool = True,
                 threshold: float = PSEUDO_LABEL_THRESHOLD, labels: str = "given",
                 gradient_score: str = "cls", gradient_start_layer: int | None = None, par: bool = False):
        if labels not in LABEL_SOURCES:
            raise UserError(f"the CAM predictor's labels must be one of {LABEL_SOURCES}, got {labels!r}")
        if cam_kind not in PREDICTOR_CAM_KINDS:
            raise UserError(f"the CAM predictor's cam_kind must be one of {PREDICTOR_CAM_KINDS}, got {cam_kind!r}")
        if not 0 <= threshold <= 1:
            raise UserError(f"the CAM predictor's threshold must lie in [0, 1], got {threshold}")
        if gradient_score not in GRADIENT_SCORES:
            raise UserError(f"the CAM predictor's gradient_score must be one of {GRADIENT_SCORES}, "
                            f"got {gradient_score!r}")
        depth = ViT(**network.encoder).depth
        if gradient_start_layer is not None and not 0 <= gradient_start_layer < depth:
            raise UserError(f"the CAM predictor's gradient_start_layer must lie in [0, {depth - 1}] for a "
                            f"{depth}-block encoder, got {gradient_start_layer}")
        self.network, self.num_classes, self.label_space = network, num_classes, label_space
        self.scales, self.cam_kind, self.refine = tuple(scales), cam_kind, refine
        self.threshold, self.labels, self.par = threshold, labels, par
        self.gradient_score = gradient_score
        self.gradient_start_layer = depth // 2 if gradient_start_layer is None else gradient_start_layer
        self.patch = network.encoder["patch_size"]

    def canvas(self, example: dict) -> tuple[int, int]:
        return tuple(np.asarray(example["image"]).shape[:2])

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        # The "predicted" labels read the image at its own size too.
        view_sizes(image.shape[:2], self.scales + ((1.0,) if self.labels == "predicted" else ()), self.patch)
        if self.labels == "predicted":
            return {"image": image}
        if "labels" not in example:
            raise UserError("the CAM predictor takes the images' labels (labels='given'), and this example has "
                            "none: use labels='predicted'")
        return {"image": image, "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def targets(self, example: dict) -> dict:
        return {"semantic": wsss_semantic(example, self.num_classes, self.label_space),
                "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def _predicted_labels(self, params: Any, image: jax.Array) -> jax.Array:
        out = self.network.apply({"params": params}, normalize(image.astype(jnp.float32) / 255)[None])
        # Both image-level heads are trained by the same multi-label loss: their mean is the prediction.
        probs = (jax.nn.sigmoid(out["cls_logits"]) + jax.nn.sigmoid(out["coarse_logits"]))[0] / 2
        return (probs > 0.5).astype(jnp.float32)

    def _gradient_attention(self, params: Any, views: jax.Array) -> tuple[jax.Array, jax.Array]:
        """GETAM maps (B, C, h, w) of each class token's row and the patch attention of the same pass."""
        # Taps cannot reach into rematerialised blocks; remat changes neither the parameters nor the numbers.
        network = self.network.clone(encoder={**self.network.encoder, "remat": False})

        def scores():
            out = network.apply({"params": params}, views)
            return out[f"{self.gradient_score}_logits"], out["patch_attention"]
        maps, patch_attention = gradient_attention(scores, range(self.num_classes), self.num_classes,
                                                   self.gradient_start_layer, has_aux=True)
        grid = (views.shape[1] // self.patch, views.shape[2] // self.patch)
        return maps.reshape(*maps.shape[:2], *grid), patch_attention

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        def cam_fn(views):
            if self.cam_kind == "gradient_attention":
                cams, patch_attention = self._gradient_attention(params, views)
                return cams, patch_attention if self.refine else None
            out = self.network.apply({"params": params}, views)
            return select_cam(out, self.cam_kind), out["patch_attention"] if self.refine else None

        def one(image, labels):
            present = self._predicted_labels(params, image) if labels is None else labels
            cams = image_cams(cam_fn, image, present, self.patch, self.scales)
            if self.par:
                cams = normalize_cams(par(image[None].astype(jnp.float32) / 255, cams[None])[0], present)
            return {"cams": cams, "present": present, "semantic": pseudo_label(cams, present, self.threshold)}
        return jax.vmap(one)(batch["image"], batch.get("labels"))

    def finish(self, outputs: dict, example: dict) -> dict:
        return {"semantic": outputs["semantic"], "cams": outputs["cams"],
                "cam_classes": np.flatnonzero(outputs["present"])}
