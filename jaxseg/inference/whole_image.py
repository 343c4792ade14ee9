"""Mask-classification outputs for a whole image of any size from a model that runs on fixed square
crops: EoMT's panoptic and instance evaluation (resize so the longer side equals the crop, zero-pad
bottom/right to the square, forward once, upsample the mask logits to the padded size, cut the valid
region, resize to the original size). The model only ever sees (crop, crop) inputs.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxseg.ops.resize import resize

Array = jax.Array


def padded_square_logits(predict: Callable[[Array], tuple[Array, Array]], image: Array, crop: int
                         ) -> tuple[Array, Array]:
    """(class logits (Q, K+1), mask logits (Q, H, W)) of one (H, W, 3) image; `predict` maps
    (1, crop, crop, 3) images to class logits (1, Q, K+1) and mask logits (1, Q, h, w)."""
    height, width = image.shape[:2]
    scale = min(crop / height, crop / width)
    size = (round(height * scale), round(width * scale))
    # PIL-style bilinear (antialiased when shrinking), as the reference resizes with PIL.
    resized = resize(jnp.asarray(image, jnp.float32), size, method="bilinear", antialias=True, axes=(0, 1))
    padded = jnp.zeros((crop, crop, 3), jnp.float32).at[:size[0], :size[1]].set(resized)
    class_logits, mask_logits = predict(padded[None])
    masks = resize(mask_logits[0].astype(jnp.float32), (crop, crop), method="bilinear", axes=(-2, -1))
    masks = resize(masks[:, :size[0], :size[1]], (height, width), method="bilinear", axes=(-2, -1))
    return class_logits[0], masks
