"""The masked autoencoder of MAE (He et al.; facebookresearch/mae `models_mae.py`) over the jaxseg ViT.

The encoder is the shared `jaxseg.models.vit.ViT`, named "encoder" as in EoMT, WeakTr and the Segmenter,
so its params are theirs (same names and shapes for the same ViT settings). It sees the visible patches
only: the ViT's own `embed` adds the position embedding to every patch token (as MAE adds it before
masking), the kept patches are gathered behind the prefix tokens, and the ViT's blocks and final norm
run on that shorter sequence. The light decoder embeds the encoded tokens, puts a shared mask token at
every removed patch (unshuffled to the patch order), adds a fixed sine-cosine position embedding, runs
its own transformer blocks and predicts each patch's pixels. Which patches are kept comes from outside
(`jaxseg.losses.mae.random_masking`), so the network is deterministic for a given mask.

Departures from the official module: the encoder's initialisation is jaxseg's ViT's (timm's), not MAE's
xavier-uniform; the encoder's position embedding is a parameter (the method initialises it with the
sine-cosine table and keeps it fixed), while the decoder's is a constant; any number of prefix tokens
(class tokens, registers) pass through the encoder and are dropped after the decoder, as MAE's one class
token is.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.vit import Block, ViT
from jaxseg.ops.posemb import sincos_posemb

Array = jax.Array


def _dense(features: int, axes: tuple, name: str) -> nn.Dense:
    # MAE initialises its linear layers xavier-uniform with zero bias.
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


class MAE(nn.Module):
    """Masked autoencoder.

    Attributes:
      encoder: ViT keyword arguments (a learned absolute position embedding; no RoPE).
      decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: the decoder's transformer (MAE's
        ViT-B/L/H use 512 wide, 8 blocks, 16 heads, MLP 2048).
    """
    encoder: dict
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048

    def setup(self):
        self.vit = ViT(**self.encoder, name="encoder")
        if self.vit.rope_base is not None:
            raise UserError("MAE gathers the position embedding of the visible patches: give the encoder a "
                            "learned absolute position embedding (rope_base=None)")
        self.decoder_embed = _dense(self.decoder_width, ("embed", None), "decoder_embed")
        self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, None)), (1, 1, self.decoder_width))
        self.decoder_blocks = [Block(self.decoder_heads, self.decoder_mlp_dim) for _ in range(self.decoder_depth)]
        self.decoder_norm = nn.LayerNorm(epsilon=1e-6)
        patch = self.vit.patch_size
        self.decoder_pred = _dense(patch * patch * self.vit.in_channels, (None, None), "decoder_pred")

    def encode(self, images: Array, ids_keep: Array, *, train: bool = False) -> Array:
        """The encoder on the kept patches `ids_keep` (B, K) of `images` (B, H, W, C): (B, prefix + K, D),
        after the ViT's final norm (if it has one)."""
        vit = self.vit
        x = vit.embed(images, train=train)
        prefix = vit.num_prefix_tokens
        kept = jnp.take_along_axis(x[:, prefix:], ids_keep[..., None], axis=1)
        x = jnp.concatenate([x[:, :prefix], kept], axis=1)
        for block in vit.blocks:
            x, _ = block(x, None, not train, False, None)
        return vit.norm(x) if vit.final_norm else x

    def decode(self, latent: Array, ids_restore: Array, grid: tuple[int, int], *, train: bool = False) -> Array:
        """Encoded tokens (B, prefix + K, D) -> predicted pixels of every patch (B, L, p * p * C), row-major
        over `grid`; `ids_restore` (B, L) places patch l at position ids_restore[l] of [kept..., removed...]."""
        prefix = self.vit.num_prefix_tokens
        x = self.decoder_embed(latent)
        batch, num_patches = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                       (batch, num_patches - (x.shape[1] - prefix), self.decoder_width))
        patches = jnp.concatenate([x[:, prefix:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :prefix], patches], axis=1)
        x = x + jnp.asarray(sincos_posemb(self.decoder_width, grid, prefix), x.dtype)
        for block in self.decoder_blocks:
            x, _ = block(x, None, not train, False, None)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def __call__(self, images: Array, ids_keep: Array, ids_restore: Array, *, train: bool = False) -> Array:
        """Predicted pixels (B, L, p * p * C) of every patch of `images` (B, H, W, C) from the patches
        `ids_keep` (B, K); `ids_keep` and `ids_restore` as `jaxseg.losses.mae.random_masking` gives them."""
        grid = self.vit.check_images(images)
        num_patches = grid[0] * grid[1]
        if ids_restore.shape != (images.shape[0], num_patches) or ids_keep.ndim != 2 \
                or ids_keep.shape[0] != images.shape[0] or not 0 < ids_keep.shape[1] <= num_patches:
            raise UserError(f"ids_keep must be (batch, kept <= {num_patches}) and ids_restore (batch, "
                            f"{num_patches}) for {images.shape[0]} images of {grid[0]}x{grid[1]} patches, got "
                            f"{ids_keep.shape} and {ids_restore.shape}")
        return self.decode(self.encode(images, ids_keep, train=train), ids_restore, grid, train=train)
