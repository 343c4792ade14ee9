"""DINO's network (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers";
facebookresearch/dino `vision_transformer.py`): the jaxseg ViT, named "encoder" as in EoMT, WeakTr and the
Segmenter, and the projection head on its class token. Student and teacher are the same module with two
parameter sets (`jaxseg.methods.dino`).

Head (`DINOHead`, norm_last_layer=True, no batch norm): Linear -> GELU -> ... -> Linear to the bottleneck,
L2-normalised, then a bias-free linear layer whose weight is normalised per output unit (torch's weight
norm with the gain fixed at 1).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.initializers import torch_default
from jaxseg.models.vit import ViT

Array = jax.Array


def _dense(features: int, name: str) -> nn.Dense:
    # DINO initialises the head's linear layers trunc_normal(0.02) with zero bias.
    return nn.Dense(features, name=name, kernel_init=nn.initializers.truncated_normal(0.02))


class DINOHead(nn.Module):
    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers - 1):
            x = nn.gelu(_dense(self.hidden_dim, f"mlp_{i}")(x), approximate=False)
        x = _dense(self.bottleneck_dim, f"mlp_{self.num_layers - 1}")(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        # torch's default Linear init of the direction (its scale is normalised away).
        direction = self.param("last_layer", torch_default(self.bottleneck_dim), (self.bottleneck_dim, self.out_dim))
        return x @ (direction / jnp.linalg.norm(direction, axis=0, keepdims=True))


class DINO(nn.Module):
    """Attributes:
      encoder: ViT keyword arguments (at least one class token: the head reads the first).
      out_dim, head_hidden_dim, head_bottleneck_dim, head_layers: the projection head (DINO's ViT-S uses
        65536, 2048, 256, 3).
    """
    encoder: dict
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3

    def setup(self):
        self.vit = ViT(**self.encoder, name="encoder")
        if self.vit.num_cls_tokens < 1:
            raise UserError("DINO's head reads the class token: give the encoder num_cls_tokens >= 1")
        self.head = DINOHead(self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim, self.head_layers)

    def __call__(self, images: Array, *, train: bool = False) -> Array:
        """images (B, H, W, C) -> head outputs (B, out_dim) of the class token."""
        tokens, _ = self.vit(images, train=train)
        return self.head(tokens[:, 0])
