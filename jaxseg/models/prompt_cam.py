"""Prompt-CAM ("Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained Analysis", Chowdhury et
al., CVPR 2025): one learned prompt per class on a frozen ViT, read out by one shared scorer.

Token order: [C class prompts, the ViT's class / register tokens, patches]. VPT-deep (the official
`train_type: prompt_cam`): before every block the C prompts of that layer are prepended and, after every
block but the last, their outputs are dropped, so each layer sees fresh prompts. VPT-shallow: the prompts
enter before the first block only and their outputs travel through every block (the VPT paper's shallow
variant; the official code has no working shallow mode for Prompt-CAM, it drops the prompts after the
first block). The last block's C prompt outputs, after the ViT's final norm where it has one, go through one
shared Linear(D -> 1): logits (B, C), the score of class c read from prompt c.

Trait maps: in the last block, the attention of prompt c over the patches, per head (the official
`attn[:, :, c, C + 1:]` for a ViT with one class token), (B, C, heads, h, w). `class_token_maps` gives
the same rows of the ViT alone, without prompts: its own class tokens' last-block attention.

Inputs are normalised images of any size of at least one patch; as WeakTr's model, the pixels beyond whole
patches are dropped, and a "dino" position embedding sees the uncropped size.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.initializers import torch_dense
from jaxseg.models.vit import ViT

Array = jax.Array
VPT_MODES = ("deep", "shallow")


def prompt_init(patch_size: int, width: int):
    """The official (VPT's) prompt init: U(-v, v), v = sqrt(6 / (3 p^2 + D)), a Xavier-uniform bound for
    the patch embedding's fan-in and the width."""
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.with_logical_partitioning(init, (None, None, "embed"))


class PromptCAM(nn.Module):
    """Prompt-CAM over a jaxseg ViT.

    Attributes:
      encoder: ViT keyword arguments (the backbone: e.g. a DINO ViT-B/16, or a WeakTr stage-1 encoder with
        C class tokens and no final norm).
      num_classes: C, one prompt per class.
      vpt: "deep" (a new set of C prompts before each block, the official mode) or "shallow" (one set
        before the first block).
      prompt_dropout: dropout on the prompts in training, one mask shared by the batch (official
        `vpt_dropout`: 0.1 for DINO, 0 for DINOv2).
    """
    encoder: dict
    num_classes: int
    vpt: str = "deep"
    prompt_dropout: float = 0.0

    def setup(self):
        if self.vpt not in VPT_MODES:
            raise UserError(f"vpt must be one of {VPT_MODES}, got {self.vpt!r}")
        if self.num_classes < 1:
            raise UserError(f"num_classes must be at least 1, got {self.num_classes}")
        self.vit = ViT(**self.encoder, name="encoder")
        vit = self.vit
        layers = vit.depth if self.vpt == "deep" else 1
        self.prompts = self.param("prompts", prompt_init(vit.patch_size, vit.width),
                                  (layers, self.num_classes, vit.width), vit.param_dtype)
        self.head = torch_dense(1, vit.width, "head", dtype=vit.dtype, param_dtype=vit.param_dtype,
                                axes=("embed", None))
        self.dropout = nn.Dropout(self.prompt_dropout)

    def _embed(self, images: Array, train: bool) -> tuple[Array, tuple[int, int], tuple | None]:
        """(embedded tokens, patch grid, RoPE tables) of images cut to whole patches."""
        vit, patch = self.vit, self.vit.patch_size
        if images.ndim != 4:
            raise UserError(f"images must be (batch, height, width, channels), got shape {images.shape}")
        input_size = images.shape[1:3]
        images = images[:, :input_size[0] // patch * patch, :input_size[1] // patch * patch]
        grid = vit.check_images(images)
        if 0 in grid:
            raise UserError(f"Prompt-CAM's input of {input_size[0]}x{input_size[1]} pixels is smaller than "
                            f"one {patch} px patch")
        return vit.embed(images, train=train, input_size=input_size), grid, vit.rope_tables(grid, train=train)

    def _layer_prompts(self, layer: int, batch: int, train: bool) -> Array:
        prompts = self.dropout(self.prompts[layer].astype(self.vit.dtype), deterministic=not train)
        return jnp.broadcast_to(prompts[None], (batch,) + prompts.shape)

    def _patch_rows(self, probs: Array, rows: int, skip: int, grid: tuple[int, int]) -> Array:
        """Attention rows 0..rows-1 over the patch columns: (B, heads, N, N) -> (B, rows, heads, h, w)."""
        maps = probs[:, :, :rows, skip:]
        return jnp.swapaxes(maps, 1, 2).reshape(maps.shape[0], rows, maps.shape[1], *grid)

    def __call__(self, images: Array, *, train: bool = False, trait_maps: bool = False) -> dict[str, Array]:
        """images (B, H, W, channels), normalised -> {"logits": (B, C)}, and with `trait_maps` the last
        block's prompt-to-patch attention {"trait_maps": (B, C, heads, h, w)}. `train`: dropout and
        stochastic depth (needs a "dropout" rng)."""
        vit, num_classes = self.vit, self.num_classes
        x, grid, rope = self._embed(images, train)
        batch, last = x.shape[0], vit.depth - 1
        probs = None
        for i, block in enumerate(vit.blocks):
            if i == 0 or self.vpt == "deep":
                prompts = self._layer_prompts(i, batch, train)
                # Deep: this layer's prompts replace the previous layer's prompt outputs.
                x = jnp.concatenate([prompts, x if i == 0 else x[:, num_classes:]], axis=1)
            x, aux = block(x, None, not train, trait_maps and i == last, rope)
            probs = aux.get("attn_probs")
        if vit.final_norm:
            x = vit.norm(x)
        out = {"logits": self.head(x[:, :num_classes])[..., 0]}
        if trait_maps:
            out["trait_maps"] = self._patch_rows(probs, num_classes, num_classes + vit.num_prefix_tokens, grid)
        return out

    def class_token_maps(self, images: Array) -> Array:
        """The ViT's own last-block attention of its class tokens over the patches, without any prompt
        (inference mode): (B, num_cls_tokens, heads, h, w)."""
        vit = self.vit
        if not vit.num_cls_tokens:
            raise UserError("the encoder has no class token whose attention could be read")
        x, grid, rope = self._embed(images, False)
        for i, block in enumerate(vit.blocks):
            x, aux = block(x, None, True, i == vit.depth - 1, rope)
        return self._patch_rows(aux["attn_probs"], vit.num_cls_tokens, vit.num_prefix_tokens, grid)
