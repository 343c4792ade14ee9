"""MAE's evaluation: the reconstruction loss on held-out images, each masked by noise seeded from its own
pixels (the same mask whatever the batch or host it lands in)."""
from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

from jaxseg.data.augment.common import normalize_image, resize
from jaxseg.errors import UserError
from jaxseg.losses.mae import normalized_targets, patchify, per_image_loss, random_masking
from jaxseg.metrics.mean import MeanMetric


class ReconstructionPredictor:
    """Each image resized to the method's crop, `method.mask_ratio` of its patches masked (noise drawn from
    `seed` and a checksum of the image), the per-image sum and count of the masked patches' losses."""
    fixed_shape = True

    def __init__(self, method, seed: int = 0):
        self.method, self.seed = method, seed

    def canvas(self, example: dict) -> tuple[int, int]:
        return (self.method.crop_size,) * 2

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        rng = np.random.default_rng([self.seed, zlib.crc32(image.tobytes())])
        image = resize({"image": image}, self.canvas(example))["image"]
        num_patches = self.method.grid[0] * self.method.grid[1]
        return {"image": normalize_image(image), "noise": rng.uniform(size=num_patches).astype(np.float32)}

    def targets(self, example: dict) -> dict:
        return {}

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        method = self.method
        ids_keep, ids_restore, mask = random_masking(batch["noise"], method.num_kept)
        pred = method.network.apply({"params": params}, batch["image"], ids_keep, ids_restore)
        targets = normalized_targets(patchify(batch["image"], method.patch_size), method.norm_pix_loss)
        total, count = per_image_loss(pred, targets, mask)
        return {"reconstruction_loss_sum": total, "reconstruction_loss_count": count}

    def finish(self, outputs: dict, example: dict) -> dict:
        raise UserError("MAE's reconstruction predictor writes no per-image predictions; it serves the "
                        "'reconstruction' metric")


class ReconstructionMetric(MeanMetric):
    """The mean loss over every masked patch of the split ("reconstruction_loss")."""
    names = ("reconstruction_loss",)
