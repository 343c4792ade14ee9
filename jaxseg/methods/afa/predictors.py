"""AFA's predictors. "cams": the multi-scale CAMs with flips of the training step (`cams.multiscale_cams`,
official scales (1, 0.5, 1.5)) at each image's own size, for the CAM sweep, with their pseudo-label map at a
background threshold (the official validation's 0.45). "random_walk": those CAMs propagated with the learned
affinity (the official validation's "aff cams"). "semantic": the segmentation head, its logits
resized bilinearly to the image at each of `scales` (each view rounded to whole patches), optionally
averaged with the flipped pass, summed over the scales, argmax (the official validation: scale 1, no
flip). The input size follows the image, so images are batched with others of their shape (the
evaluator's own-shape mode)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.methods.afa.cams import multiscale_cams, scaled_size
from jaxseg.models.afa import Afa
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import resize
from jaxseg.wsss.cam import pseudo_label, wsss_semantic
from jaxseg.wsss.par import present_argmax, with_background
from jaxseg.wsss.random_walk import propagate_cams, radius_mask

# The official validation's background score of the CAM labels (`cam.bkg_score`).
CAM_THRESHOLD = 0.45


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise UserError(f"the AFA predictor's scales must be a non-empty list of numbers > 0, got {scales}")
    return scales


def _inputs(batch: dict) -> jax.Array:
    return normalize(batch["image"].astype(jnp.float32) / 255)


class _OwnShape:
    fixed_shape = False

    def __init__(self, method):
        self.method = method
        self.patch = method.patch

    def canvas(self, example: dict) -> tuple[int, int]:
        return tuple(np.asarray(example["image"]).shape[:2])

    def targets(self, example: dict) -> dict:
        return {"semantic": wsss_semantic(example, self.method.num_classes, self.method.data.ground_truth),
                "labels": np.asarray(example["labels"][:self.method.num_classes], np.float32)}


class CamPredictor(_OwnShape):
    """`scales` of the CAM passes; `threshold`: the background of the "semantic" pseudo-label map. The
    image-level labels are the example's (cut to the C classes)."""

    def __init__(self, method, scales: Sequence[float] = (1.0, 0.5, 1.5), threshold: float = CAM_THRESHOLD):
        super().__init__(method)
        if not 0 <= threshold <= 1:
            raise UserError(f"the AFA CAM predictor's threshold must lie in [0, 1], got {threshold}")
        self.scales, self.threshold = _check_scales(scales), threshold

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        if "labels" not in example:
            raise UserError("the AFA CAM predictor reads the images' labels, and this example has none")
        return {"image": np.asarray(example["image"]),
                "labels": np.asarray(example["labels"][:self.method.num_classes], np.float32)}

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images, labels = _inputs(batch), batch["labels"]
        size = images.shape[1:3]
        views = resize(images, scaled_size(size, 1.0, self.patch), axes=(1, 2))
        cams, _ = multiscale_cams(self.method.cam_fn(params), views, labels, self.scales, self.patch)
        cams = resize(cams, size, axes=(2, 3))
        semantic = jax.vmap(lambda c, y: pseudo_label(c, y, self.threshold))(cams, labels)
        return {"cams": cams, "present": labels, "semantic": semantic}

    def finish(self, outputs: dict, example: dict) -> dict:
        return {"semantic": outputs["semantic"], "cams": outputs["cams"],
                "cam_classes": np.flatnonzero(outputs["present"])}


class RandomWalkPredictor(CamPredictor):
    """The official validation's "aff cams": the CAMs of `CamPredictor` resized to the patch grid,
    propagated by one random-walk step with the learned affinity of the image at scale 1 (`radius` patches,
    a `background` plane at 0.35, `jaxseg.wsss.random_walk.propagate_cams`), resized back, argmax over the
    background and the present classes ("semantic")."""

    def __init__(self, method, scales: Sequence[float] = (1.0, 0.5, 1.5), background: float = 0.35,
                 radius: int = 8):
        super().__init__(method, scales)
        if not 0 <= background <= 1 or radius < 1:
            raise UserError(f"the AFA random-walk predictor needs background in [0, 1] and radius >= 1, got "
                            f"{background} and {radius}")
        self.background, self.radius = background, radius

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images, labels = _inputs(batch), batch["labels"]
        size = images.shape[1:3]
        views = resize(images, scaled_size(size, 1.0, self.patch), axes=(1, 2))
        cams, _ = multiscale_cams(self.method.cam_fn(params), views, labels, self.scales, self.patch)
        _, affinity = self.method.cam_fn(params)(views, True)
        grid = (views.shape[1] // self.patch, views.shape[2] // self.patch)
        walked = propagate_cams(resize(cams, grid, axes=(2, 3)), affinity, labels, self.background,
                                mask=radius_mask(grid, self.radius))
        _, keys = with_background(cams, labels, self.background)
        return {"semantic": present_argmax(resize(walked, size, axes=(2, 3)), keys)}

    def finish(self, outputs: dict, example: dict) -> dict:
        return {"semantic": outputs["semantic"]}


class SegmentationPredictor(_OwnShape):
    """`scales` of the passes (each view rounded to whole patches); `flip`: average each with its flipped
    pass."""

    def __init__(self, method, scales: Sequence[float] = (1.0,), flip: bool = False):
        super().__init__(method)
        self.scales, self.flip = _check_scales(scales), flip

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        return {"image": np.asarray(example["image"])}

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = _inputs(batch)
        size = images.shape[1:3]

        def logits(views):
            out = self.method.network.apply({"params": params}, views, method=Afa.segment)
            return resize(out, size)

        total = 0.0
        for scale in self.scales:
            views = resize(images, scaled_size(size, scale, self.patch), axes=(1, 2))
            plain = logits(views)
            total = total + ((plain + logits(views[:, :, ::-1])[:, :, ::-1]) / 2 if self.flip else plain)
        return {"semantic": jnp.argmax(total, axis=-1).astype(jnp.int32)}

    def finish(self, outputs: dict, example: dict) -> dict:
        return {"semantic": outputs["semantic"]}
