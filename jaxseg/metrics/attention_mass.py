"""How much of a class's attention falls on the class: per attention head, the fraction of the attention
mass over the patches that lies inside the ground-truth region of that class (Prompt-CAM's trait maps, a
ViT's class-token attention).

Per image and present class c, and per head h, with a the map over the patch grid (C, heads, h, w), f_c
the fraction of each patch's pixels labelled c and v the fraction that is not ignored:
    inside(c, h) = sum_p a[c, h, p] f_c[p] / sum_p a[c, h, p] v[p],
i.e. each patch's attention spread evenly over its pixels and the share landing on class c among the
labelled pixels. The result averages it over every (image, present class) pair, per head; `area_fraction`
is the same average for a uniform map (the class's share of the labelled area): the level of a head that
does not look at the class at all.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.metrics.accumulators import IGNORE, _Summed


def patch_fractions(semantic, num_foreground: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(class fractions (C, h, w), labelled fraction (h, w)) of each whole patch of an (H, W) label map in
    the WSSS space (0 background, c + 1 foreground class c, 255 ignored); the pixels beyond whole patches
    are dropped, as the ViT drops them."""
    semantic = np.asarray(semantic)
    rows, cols = semantic.shape[0] // patch_size, semantic.shape[1] // patch_size
    if rows == 0 or cols == 0:
        raise UserError(f"a {semantic.shape[0]}x{semantic.shape[1]} label map is smaller than one "
                        f"{patch_size} px patch")
    cells = semantic[:rows * patch_size, :cols * patch_size].reshape(rows, patch_size, cols, patch_size)
    classes = np.arange(1, num_foreground + 1)[:, None, None, None, None]
    fractions = (cells[None] == classes).mean((2, 4))
    return fractions.astype(np.float32), (cells != IGNORE).mean((1, 3)).astype(np.float32)


class AttentionMassMetric(_Summed):
    """Reads `key` of the prediction, (C, heads, h, w) attention over the patch grid, and the targets
    "fractions" / "valid" (`patch_fractions` on the model's grid) and "labels" (C,)."""

    def __init__(self, num_foreground: int, key: str = "trait_maps"):
        self.num_foreground, self.key = num_foreground, key

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        del canvas  # on the patch grid of the image's own size
        return {"fractions": np.asarray(target["fractions"], np.float32),
                "valid": np.asarray(target["valid"], np.float32),
                "labels": np.asarray(target["labels"][:self.num_foreground], np.float32)}

    def stats(self, prediction, targets):
        maps = prediction[self.key].astype(jnp.float32)
        fractions, valid, present = targets["fractions"], targets["valid"], targets["labels"]
        inside = jnp.einsum("chij,cij->ch", maps, fractions)
        labelled = jnp.einsum("chij,ij->ch", maps, valid)
        share = inside / jnp.maximum(labelled, jnp.finfo(jnp.float32).tiny)
        area = fractions.sum((1, 2)) / jnp.maximum(valid.sum(), 1.0)
        return {"inside": (share * present[:, None]).sum(0), "area": (area * present).sum(),
                "pairs": present.sum()}

    def result(self) -> dict:
        if self.totals is None or self.totals["pairs"] == 0:
            raise UserError("the attention-mass metric has no image with a present class")
        per_head = self.totals["inside"] / self.totals["pairs"]
        return {"attention_mass_per_head": [float(v) for v in per_head],
                "attention_mass_mean": float(per_head.mean()), "attention_mass_best": float(per_head.max()),
                "area_fraction": float(self.totals["area"] / self.totals["pairs"]),
                "class_pairs": int(self.totals["pairs"])}
