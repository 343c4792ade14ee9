"""Segmenter (Strudel et al.): a ViT encoder with a linear or a mask-transformer decoder; the network of
WeakTr's stage 2 (`OnlineRetraining/segm/model/{segmenter,decoder}.py`).

Mask-transformer decoder: patch tokens (encoder output after its final norm, prefix tokens dropped) are
projected, N learnable class embeddings are appended, pre-norm transformer blocks run over the joint
sequence, then a LayerNorm; patches and class embeddings are projected by bias-free matrices,
L2-normalised, and their cosine similarities (B, P, N) go through a LayerNorm over the class axis. The
logits are upsampled bilinearly to the (padded) input size. WeakTr reads the decoder after each of its
last blocks (its `MultiMaskTransformer`); `__call__` returns the logits after every decoder block and
`combine_readouts` forms WeakTr's inference score 0.8 * P(block 1) + P(block 2).
Inputs whose size is not a multiple of the patch size are zero-padded bottom/right and the logits cropped.
The linear decoder is Segmenter's `DecoderLinear`: one Linear from each patch token to N logits.
`decode` runs the decoder alone on given encoder tokens (the official decoders' `forward(x, im_size)`).
Official checkpoints (rstrudel/segmenter, WeakTr stage 2) convert with `jaxseg.convert.from_official_segmenter`.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.models.vit import Block, ViT
from jaxseg.ops.resize import resize

Array = jax.Array
DECODERS = ("mask_transformer", "linear")


class Segmenter(nn.Module):
    """Attributes:
      encoder: ViT keyword arguments (final_norm=True: Segmenter decodes normalised tokens).
      num_classes: N, background included.
      decoder: "mask_transformer" (WeakTr) or "linear" (plain Segmenter baseline).
      decoder_depth, decoder_heads, decoder_mlp_dim: WeakTr uses 2 blocks, 6 heads, MLP 1536; the decoder
        width is the encoder's.
      decoder_dropout, decoder_drop_path: 0.1 and 0.0 in WeakTr.
    """
    encoder: dict
    num_classes: int
    decoder: str = "mask_transformer"
    decoder_depth: int = 2
    decoder_heads: int = 6
    decoder_mlp_dim: int = 1536
    decoder_dropout: float = 0.1
    decoder_drop_path: float = 0.0

    def setup(self):
        if self.decoder not in DECODERS:
            raise UserError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        self.vit = ViT(**self.encoder, name="encoder")
        if not self.vit.final_norm:
            raise UserError("Segmenter decodes the encoder's normalised tokens: set final_norm=True")
        width = self.vit.width
        dense = dict(kernel_init=nn.initializers.truncated_normal(0.02))
        if self.decoder == "linear":
            self.head = nn.Dense(self.num_classes, **dense)
            return
        self.proj_dec = nn.Dense(width, **dense)
        self.cls_emb = self.param("cls_emb", nn.initializers.truncated_normal(0.02),
                                  (1, self.num_classes, width))
        rates = np.linspace(0.0, self.decoder_drop_path, self.decoder_depth)
        # torch's default LayerNorm eps (1e-5) throughout the decoder, as in Segmenter.
        self.blocks = [Block(self.decoder_heads, self.decoder_mlp_dim, layernorm_eps=1e-5,
                             drop_path_rate=float(rate), dropout_rate=self.decoder_dropout,
                             attention_dropout_rate=self.decoder_dropout) for rate in rates]
        self.decoder_norm = nn.LayerNorm(epsilon=1e-5)
        projection = nn.initializers.normal(width ** -0.5)
        self.proj_patch = self.param("proj_patch", projection, (width, width))
        self.proj_classes = self.param("proj_classes", projection, (width, width))
        self.mask_norm = nn.LayerNorm(epsilon=1e-5)

    def _masks(self, tokens: Array, grid: tuple[int, int]) -> Array:
        """Decoder read-out of a joint sequence: (B, h, w, N) logits."""
        tokens = self.decoder_norm(tokens)
        patches = tokens[:, :-self.num_classes] @ self.proj_patch
        classes = tokens[:, -self.num_classes:] @ self.proj_classes
        patches = patches / jnp.linalg.norm(patches, axis=-1, keepdims=True)
        classes = classes / jnp.linalg.norm(classes, axis=-1, keepdims=True)
        masks = self.mask_norm(jnp.einsum("bpc,bnc->bpn", patches, classes))
        return masks.reshape(masks.shape[0], *grid, self.num_classes)

    def decode(self, tokens: Array, grid: tuple[int, int], *, train: bool = False) -> Array:
        """The decoder alone: patch tokens (B, rows * cols, D) of the encoder (after its final norm,
        prefix tokens dropped, row-major over `grid` = (rows, cols)) -> logits at patch resolution
        (R, B, rows, cols, N), R read-outs as in `__call__`. Use it through
        `model.apply(variables, tokens, grid, method=Segmenter.decode)`; `grid` is static under jit."""
        rows, cols = grid
        if tokens.ndim != 3 or tokens.shape[1:] != (rows * cols, self.vit.width):
            raise UserError(f"tokens must be (batch, {rows} x {cols} patches, width {self.vit.width}) for grid "
                            f"{tuple(grid)}, got {tokens.shape}")
        if self.decoder == "linear":
            return self.head(tokens).reshape(1, tokens.shape[0], rows, cols, self.num_classes)
        x = self.proj_dec(tokens)
        x = jnp.concatenate([x, jnp.broadcast_to(self.cls_emb, (x.shape[0],) + self.cls_emb.shape[1:])], 1)
        readouts = []
        for block in self.blocks:
            x, _ = block(x, None, not train, False)
            readouts.append(self._masks(x, (rows, cols)))
        return jnp.stack(readouts)

    def __call__(self, images: Array, *, train: bool = False) -> Array:
        """images (B, H, W, C) -> logits (R, B, H, W, N): one read-out after each decoder block (R = depth)
        for the mask transformer, R = 1 for the linear decoder."""
        if images.ndim != 4:
            raise UserError(f"images must be (batch, height, width, channels), got {images.shape}")
        height, width = images.shape[1:3]
        patch = self.vit.patch_size
        padded = jnp.pad(images, ((0, 0), (0, -height % patch), (0, -width % patch), (0, 0)))
        grid = self.vit.check_images(padded)
        tokens, _ = self.vit(padded, train=train)
        readouts = self.decode(tokens[:, self.vit.num_prefix_tokens:], grid, train=train)
        return jnp.stack([resize(r, padded.shape[1:3], method="bilinear")[:, :height, :width] for r in readouts])


def combine_readouts(logits: Array, weights: Sequence[float] = (0.8, 1.0)) -> Array:
    """WeakTr's inference score: sum_i weights[i] * softmax(readout i) over the last len(weights)
    read-outs of (R, B, H, W, N) logits -> (B, H, W, N)."""
    if len(weights) > logits.shape[0]:
        raise UserError(f"{len(weights)} weights for {logits.shape[0]} read-outs")
    probs = jax.nn.softmax(logits[-len(weights):].astype(jnp.float32), axis=-1)
    return jnp.einsum("r,rbhwn->bhwn", jnp.asarray(weights, jnp.float32), probs)
