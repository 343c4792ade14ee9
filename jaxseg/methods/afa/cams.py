"""AFA's multi-scale CAMs (rulixiang/afa `utils/camutils.py` multi_scale_cam(_with_aff_mat)), shared by the
training step (pseudo-labels) and the CAM predictor: at each scale s the batch resized bilinearly to
(int(s H), int(s W)) rounded to whole patches (`scaled_size`; scale 1 of a crop: as is), CAMs of it and of
its horizontal flip, both resized bilinearly to (H, W), the flip flipped back, their element-wise maximum,
ReLU; summed over the scales and min-max normalised per image and class (eps 1e-5); absent classes 0 (the
official keeps them, and every use multiplies them by the labels). The affinity is the unflipped pass's at
the largest scale."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.ops.resize import resize
from jaxseg.wsss.cam import normalize_cams

Array = jax.Array
# (views (n, h, w, 3), with affinity) -> (CAMs (n, C, h / p, w / p), affinity (n, P, P) or None)
CamFn = Callable[[Array, bool], tuple[Array, Array | None]]
NORMALIZE_EPS = 1e-5


def scaled_size(size: Sequence[int], scale: float, patch: int) -> tuple[int, int]:
    """The official view size (int(s H), int(s W)), each side rounded to the nearest whole number of patches
    (at least one): the ViT's stem takes no partial patch, unlike MiT's overlapping one. The official crop
    320 at scales 0.5 and 1.5 (patch 16) needs no rounding."""
    return tuple(patch * max(1, round(int(scale * side) / patch)) for side in size)


def multiscale_cams(cam_fn: CamFn, images: Array, labels: Array, scales: Sequence[float],
                    patch: int) -> tuple[Array, Array]:
    """(normalised CAMs (B, C, H, W), affinity of the largest scale (B, P, P)) of normalised images
    (B, H, W, 3) and multi-hot labels (B, C) (module docstring); views sized by `scaled_size`."""
    batch, height, width = images.shape[:3]
    largest = int(np.argmax(scales))
    total, affinity = 0.0, None
    for i, scale in enumerate(scales):
        views = resize(images, scaled_size((height, width), scale, patch), axes=(1, 2))
        cams, view_affinity = cam_fn(jnp.concatenate([views, views[:, :, ::-1]]), i == largest)
        cams = resize(cams, (height, width), axes=(2, 3))
        total = total + jax.nn.relu(jnp.maximum(cams[:batch], cams[batch:, :, :, ::-1]))
        if i == largest:
            affinity = view_affinity[:batch]
    normalized = jax.vmap(lambda c, y: normalize_cams(c, y, NORMALIZE_EPS))(total, labels)
    return normalized, affinity
