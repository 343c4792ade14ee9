"""CLIP (Radford et al. 2021) in Flax linen: a ViT image tower and a causal text transformer whose pooled
outputs are projected into one embedding space, plus the learned logit scale.

Image tower: jaxseg's `ViT` with `pre_norm` (OpenAI's `ln_pre`, no patch bias), one class token whose
position entry is part of the position embedding, LayerNorm eps 1e-5, QuickGELU MLPs and the final norm
as `ln_post`; CLIP pools the class token and multiplies it by `image_projection` (width, embed_dim).
Other input sizes resample the position embedding as the ViT's `posemb_resize` says (CLIP-ES: "bilinear",
`jaxseg.ops.posemb.resample_posemb`).
Text tower (`TextTransformer`): token + learned position embeddings, pre-norm blocks (the ViT's `Block`)
under a causal mask, `ln_final`, the end-of-text token pooled and projected by `projection`.

Parameter names: {"vision": ViT names (`patch_embed`, `cls_token`, `pos_embed`, `norm_pre`, `blocks_{i}`,
`norm`), "image_projection", "text": {"token_embedding", "pos_embed", "blocks_{i}", "ln_final",
"projection"}, "logit_scale"}. `jaxseg.convert.clip` maps OpenAI / open_clip and transformers checkpoints
onto them. Parameters carry logical axis names as the ViT's do ("vocab" for the token table, unmapped by
the default rules, so replicated).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.vit import Block, ViT, _layer_norm

Array = jax.Array
Dtype = Any

POOLS = ("token", "patch_mean")


def clip_vision_config(width: int = 768, depth: int = 12, num_heads: int = 12, patch_size: int = 16,
                       image_size: int = 224, **overrides) -> dict:
    """ViT keyword arguments of a CLIP image tower (defaults: ViT-B/16 at 224 px)."""
    grid = image_size // patch_size
    config = dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=4 * width, patch_size=patch_size,
                  posemb_grid=(grid, grid), num_cls_tokens=1, posemb_covers_prefix=True, pre_norm=True,
                  final_norm=True, mlp_type="quick_gelu", layernorm_eps=1e-5, posemb_resize="bilinear")
    config.update(overrides)
    return config


class TextTransformer(nn.Module):
    """CLIP's text tower: (B, L) token ids, L <= context_length, each sequence holding its end-of-text
    token as its largest id (as CLIP's tokenizer does) -> (B, embed_dim) features of that token."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int = 512
    mlp_type: str = "quick_gelu"
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.token_embedding = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_length, self.width), self.param_dtype)
        self.blocks = [Block(self.num_heads, self.mlp_dim, self.mlp_type, layernorm_eps=self.layernorm_eps,
                             dtype=self.dtype, param_dtype=self.param_dtype) for _ in range(self.depth)]
        self.ln_final = _layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "ln_final")
        self.projection = self.param(
            "projection", nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                                       ("embed", None)),
            (self.width, self.embed_dim), self.param_dtype)

    def __call__(self, token_ids: Array) -> Array:
        if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= self.context_length:
            raise UserError(f"token ids must be (batch, length) with length in 1..{self.context_length}, got "
                            f"shape {token_ids.shape}")
        if not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise UserError(f"token ids must be integers, got {token_ids.dtype}")
        batch, length = token_ids.shape
        x = self.token_embedding(token_ids) + self.pos_embed[:length].astype(self.dtype)
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        for block in self.blocks:
            x, _ = block(x, causal)
        x = self.ln_final(x)
        # argmax picks the first end-of-text token (the largest id), as OpenAI's and CLIP-ES's code do.
        pooled = x[jnp.arange(batch), jnp.argmax(token_ids, axis=-1)]
        return pooled @ self.projection.astype(self.dtype)


class CLIP(nn.Module):
    """CLIP with a ViT image tower.

    Attributes:
      vision: ViT keyword arguments (`clip_vision_config`); needs one class token, `pre_norm` and
        `final_norm` (CLIP's `ln_pre` and `ln_post`).
      text: `TextTransformer` keyword arguments other than `embed_dim`.
      embed_dim: width of the joint embedding space.
    """
    vision: dict
    text: dict
    embed_dim: int = 512

    def setup(self):
        self.visual = ViT(**self.vision, name="vision")
        if self.visual.num_cls_tokens != 1 or self.visual.num_registers or not self.visual.final_norm:
            raise UserError("a CLIP image tower has one class token, no registers and its final norm (ln_post); "
                            f"got num_cls_tokens={self.visual.num_cls_tokens}, num_registers="
                            f"{self.visual.num_registers}, final_norm={self.visual.final_norm}")
        self.image_projection = self.param(
            "image_projection", nn.with_logical_partitioning(nn.initializers.normal(self.visual.width ** -0.5),
                                                             ("embed", None)),
            (self.visual.width, self.embed_dim), self.visual.param_dtype)
        self.text_tower = TextTransformer(**self.text, embed_dim=self.embed_dim, name="text")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

    def encode_image(self, images: Array, *, pool: str = "token",
                     return_attention: bool = False) -> tuple[Array, dict]:
        """images (B, H, W, 3), CLIP-normalised -> ((B, embed_dim) features, the ViT's intermediates).

        pool: "token" (CLIP: the class token) or "patch_mean" (CLIP-ES: the mean of the patch tokens,
          both after `ln_post`).
        """
        if pool not in POOLS:
            raise UserError(f"pool must be one of {POOLS}, got {pool!r}")
        tokens, out = self.visual(images, return_attention=return_attention)
        pooled = tokens[:, 0] if pool == "token" else tokens[:, self.visual.num_prefix_tokens:].mean(1)
        return pooled @ self.image_projection.astype(pooled.dtype), out

    def encode_text(self, token_ids: Array) -> Array:
        """(B, L) token ids -> (B, embed_dim) features."""
        return self.text_tower(token_ids)

    def __call__(self, images: Array, token_ids: Array) -> dict[str, Array]:
        """{"image_features" (B, E), "text_features" (T, E) (not normalised), "logits_per_image" (B, T):
        exp(logit_scale) times the cosine similarities}."""
        image_features, _ = self.encode_image(images)
        text_features = self.encode_text(token_ids)
        return {"image_features": image_features, "text_features": text_features,
                "logits_per_image": similarity_logits(image_features, text_features, self.logit_scale)}


def l2_normalize(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def similarity_logits(image_features: Array, text_features: Array, logit_scale: Array) -> Array:
    """exp(logit_scale) * cos(image, text): (B, E), (T, E) -> (B, T)."""
    return jnp.exp(logit_scale) * l2_normalize(image_features) @ l2_normalize(text_features).T
