"""CutMix batches with TransMix label weights (Chen et al., "TransMix: Attend to Mix for Vision
Transformers", CVPR 2022; Beckschen/TransMix `transmix.py` Mixup_transmix on timm's `mixup.py`): pure,
jit-able, static shapes.

As the official (its `mode="batch"`): with probability `prob`, one lambda ~ Beta(alpha, alpha) and one box
for the whole batch; the box has sides int(H sqrt(1 - lambda)) x int(W sqrt(1 - lambda)) around a uniform
centre, clipped to the image (timm's `rand_bbox`), and image b takes the box of image B - 1 - b (the
batch flipped). Without a mix the box is empty. TransMix then weights the pasted image's labels by
    lambda_b = (area(box) / (H W) + sum_{patches in box} a_b / sum_{patches} a_b) / 2
with a_b the class token's last-layer attention over the patch tokens, averaged over the heads and
without gradients; the box is brought to the patch grid by nearest sampling (torch's `nn.Upsample`, the
top-left pixel of each patch for a whole number of pixels per patch). The mixed labels are
y_b (1 - lambda_b) + y_{B-1-b} lambda_b (no label smoothing here). The official's loss, for single-label
classification, is timm's soft-target cross-entropy, which for these targets (each summing to 1) is
`jaxseg.losses.multilabel.soft_target_cross_entropy`; WeakTr keeps its multi-label soft-margin losses.
Several attention rows (WeakTr's class tokens) give one lambda per row (`transmix_lambda` on (B, K, P)
attention gives (B, K)).

The official also mixes whole images (Mixup, whose labels keep the area ratio); only CutMix is here.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError

Array = jax.Array
ATTENTION_ROWS = ("per_class", "mean")


@dataclasses.dataclass(frozen=True)
class TransMixConfig:
    """`prob`: the probability that a batch is mixed, 0 (default) turns TransMix off (the official recipe:
    1.0, timm's mixup_prob); `alpha`: lambda ~ Beta(alpha, alpha) (the official's cutmix alpha, 1.0);
    `attention`: for a model with one class token per class (WeakTr), whose attention weighs class c's
    label: "per_class" (class c's own token) or "mean" (the mean of the class tokens' attention, one
    lambda for every class, as a single class token gives)."""
    prob: float = setting(0.0, "in [0, 1]")
    alpha: float = setting(1.0, "> 0")
    attention: str = "per_class"

    def __post_init__(self):
        check_rules(self)
        if self.attention not in ATTENTION_ROWS:
            raise UserError(f"transmix.attention must be one of {ATTENTION_ROWS}, got {self.attention!r}")


def box_from_lambda(lam: Array, center: Array, size: tuple[int, int]) -> Array:
    """timm's `rand_bbox` for a given lambda and centre (cy, cx): (yl, yh, xl, xh) int32."""
    height, width = size
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy, cx = center[0], center[1]
    return jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
                      jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)])


def sample_box(rng: Array, size: tuple[int, int], prob: float, alpha: float) -> Array:
    """The batch's CutMix box (yl, yh, xl, xh) int32: with probability `prob` lambda ~ Beta(alpha, alpha)
    and a uniform centre, else the empty box."""
    mix_rng, lam_rng, y_rng, x_rng = jax.random.split(rng, 4)
    lam = jax.random.beta(lam_rng, alpha, alpha)
    center = jnp.stack([jax.random.randint(y_rng, (), 0, size[0]), jax.random.randint(x_rng, (), 0, size[1])])
    box = box_from_lambda(lam, center, size)
    return jnp.where(jax.random.uniform(mix_rng) < prob, box, jnp.zeros_like(box))


def _inside(box: Array, rows: Array, cols: Array) -> Array:
    return ((rows[:, None] >= box[0]) & (rows[:, None] < box[1]) & (cols[None] >= box[2]) & (cols[None] < box[3]))


def cutmix(images: Array, box: Array) -> Array:
    """Images (B, H, W, ...) with the box taken from the batch flipped (image B - 1 - b)."""
    inside = _inside(box, jnp.arange(images.shape[1]), jnp.arange(images.shape[2]))
    inside = inside.reshape(inside.shape + (1,) * (images.ndim - 3))
    return jnp.where(inside, images[::-1], images)


def area_ratio(box: Array, size: tuple[int, int]) -> Array:
    """The pasted share of the image, (yh - yl)(xh - xl) / (H W): CutMix's weight of the pasted labels."""
    return ((box[1] - box[0]) * (box[3] - box[2])).astype(jnp.float32) / (size[0] * size[1])


def _nearest(source: int, target: int) -> np.ndarray:
    """torch's nearest-neighbour source index of each target index (upsample_nearest, float32 scale)."""
    scale = np.float32(source / target)
    return np.minimum(np.floor(np.arange(target, dtype=np.float32) * scale).astype(np.int32), source - 1)


def box_on_grid(box: Array, size: tuple[int, int], grid: tuple[int, int]) -> Array:
    """The box as a (rows * cols,) 0/1 mask of the patch grid, nearest-sampled as the official."""
    return _inside(box, jnp.asarray(_nearest(size[0], grid[0])),
                   jnp.asarray(_nearest(size[1], grid[1]))).reshape(-1).astype(jnp.float32)


def transmix_lambda(attention: Array, box: Array, size: tuple[int, int], grid: tuple[int, int]) -> Array:
    """TransMix's weight of the pasted labels (module docstring): attention (B, [K,] P) over the patch
    tokens of the mixed images (P = rows * cols of `grid`) -> (B, [K])."""
    if attention.shape[-1] != grid[0] * grid[1]:
        raise UserError(f"the attention covers {attention.shape[-1]} patches, the grid {grid} has "
                        f"{grid[0] * grid[1]}")
    attention = jax.lax.stop_gradient(attention.astype(jnp.float32))
    mask = box_on_grid(box, size, grid)
    pasted, kept = (attention * mask).sum(-1), (attention * (1 - mask)).sum(-1)
    return (area_ratio(box, size) + pasted / (kept + pasted)) / 2


def mix_labels(labels: Array, lam: Array) -> Array:
    """labels (B, C) (one-hot or multi-hot) mixed with the batch flipped: y (1 - lam) + y_flipped lam,
    lam (B,) or (B, C) (one weight per class), or a scalar."""
    lam = jnp.asarray(lam, jnp.float32)
    lam = lam[:, None] if lam.ndim == 1 else lam
    labels = labels.astype(jnp.float32)
    return labels * (1 - lam) + labels[::-1] * lam

