"""EoMT: the Encoder-only Mask Transformer ("Your ViT is Secretly an Image Segmentation Model").

Q learnable queries are prepended to the ViT's tokens before block L - L2 (token order
[queries, cls, registers, patches]). Predictions read the ViT's own final norm: a class head (K + 1,
the last index is "no object") on the queries, and mask logits = mask-MLP(queries) . upscaled patch
features at stride 4 (transposed conv 2x2/2 -> GELU -> depthwise 3x3 -> LayerNorm, repeated).

Masked attention (training): before each of the last L2 blocks a prediction is made from that block's
input; its mask logits, resized to the patch grid, decide which patches each query may attend to
(logit > 0). Each (image, query) row is unmasked with probability 1 - p_i, where p (one value per
block) is an array argument, so annealing it never recompiles. All L2 + 1 predictions are returned for
deep supervision. Without p (inference) only the final prediction is computed.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.initializers import torch_default, torch_dense
from jaxseg.models.vit import ViT, vit_config
from jaxseg.ops.image import check_unit_range, normalize
from jaxseg.ops.resize import resize

Array = jax.Array

# Blocks that see the queries (L2) by backbone size (tue-mps/eomt configs).
QUERY_BLOCKS = {"S": 3, "B": 3, "L": 4, "g": 5}


def eomt_config(size: str = "L", *, num_classes: int, num_queries: int = 200, image_size: int = 640,
                patch_size: int = 16, backbone: str = "dinov2_reg", **encoder_overrides) -> dict:
    """Keyword arguments of `EoMT` for the paper's backbones at patch 16: DINOv2 with registers (its
    position embedding resized to the input grid) or DINOv3 (`backbone="dinov3"`, RoPE)."""
    if image_size % patch_size:
        raise UserError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if backbone not in ("dinov2_reg", "dinov3"):
        raise UserError(f"EoMT's backbone must be 'dinov2_reg' or 'dinov3', got {backbone!r}")
    grid = image_size // patch_size
    encoder = vit_config(f"{size}/{patch_size}", backbone, posemb_grid=(grid, grid), **encoder_overrides)
    return dict(encoder=encoder, num_classes=num_classes, num_queries=num_queries,
                num_query_blocks=QUERY_BLOCKS[size])


class TransposedConv2x2(nn.Module):
    """ConvTranspose2d(kernel 2, stride 2): every input pixel is scattered into its own 2x2 output block,
    which is an einsum (no kernel-flip conventions to get wrong). kernel[a, b, c, o] is torch's
    weight[c, o, a, b] (torch layout (in, out, kh, kw)). NHWC in and out."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        # torch computes the fan-in of a transposed conv from its output channels: 4 * channels here.
        kernel = self.param("kernel", torch_default(4 * channels, (None, None, "embed", None)),
                            (2, 2, channels, channels), self.param_dtype)
        bias = self.param("bias", torch_default(4 * channels, (None,)), (channels,), self.param_dtype)
        x = jnp.einsum("nijc,abco->niajbo", x, kernel.astype(self.dtype))
        return x.reshape(batch, 2 * height, 2 * width, channels) + bias.astype(self.dtype)


class DepthwiseConv3x3(nn.Module):
    """Depthwise 3x3 convolution, padding 1, no bias (kernel (3, 3, 1, C) as flax's grouped Conv stores
    it), written as nine shifted products: XLA's SPMD partitioner mis-sums the weight gradient of
    feature-grouped convolutions over replicated mesh axes (4x on a data x tensor=4 mesh, seen on CPU)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", torch_default(9, (None, None, None, "embed")), (3, 3, 1, channels),
                            self.param_dtype).astype(self.dtype)
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(padded[:, a:a + height, b:b + width] * kernel[a, b, 0] for a in range(3) for b in range(3))


class ScaleBlock(nn.Module):
    """x2 upsampling: transposed conv 2x2/2 -> exact GELU -> depthwise conv 3x3 (no bias) -> LayerNorm over
    channels (eps 1e-6). NHWC in and out."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = TransposedConv2x2(self.dtype, self.param_dtype, name="conv1")(x)
        x = nn.gelu(x, approximate=False)
        x = DepthwiseConv3x3(self.dtype, self.param_dtype, name="conv2")(x)
        return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)


class EoMT(nn.Module):
    """EoMT over a jaxseg ViT.

    Attributes:
      encoder: ViT keyword arguments (see `vit_config`; the paper uses DINOv2 with registers, patch 16).
      num_classes: K, without the "no object" class.
      num_queries: Q.
      num_query_blocks: L2, the last blocks that see the queries.
      num_upscale_blocks: x2 upsampling blocks; default as the official model, max(1, log2(P) - 2)
        (2 for patch 16, i.e. stride 4).
      normalize_input: inputs are RGB in [0, 1] (values outside are refused when not traced) and normalised
        with ImageNet mean/std inside the model (as the official EoMT); False for already-normalised inputs.
    """
    encoder: dict
    num_classes: int
    num_queries: int = 200
    num_query_blocks: int = 4
    num_upscale_blocks: int | None = None
    normalize_input: bool = True

    def setup(self):
        self.vit = ViT(**self.encoder, name="encoder")
        if not 0 < self.num_query_blocks <= self.vit.depth:
            raise UserError(f"num_query_blocks must be in 1..{self.vit.depth}, got {self.num_query_blocks}")
        if not self.vit.final_norm:
            raise UserError("EoMT predicts from the ViT's final norm; the encoder needs final_norm=True")
        width, dtype, param_dtype = self.vit.width, self.vit.dtype, self.vit.param_dtype
        self.queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "embed")), (self.num_queries, width), param_dtype)
        linear = dict(dtype=dtype, param_dtype=param_dtype, axes=("embed", None))
        self.class_head = torch_dense(self.num_classes + 1, width, "class_head", **linear)
        self.mask_head = [torch_dense(width, width, f"mask_head_{i}", **linear)
                          for i in range(3)]
        num_upscale = self.num_upscale_blocks
        if num_upscale is None:
            num_upscale = max(1, int(math.log2(self.vit.patch_size)) - 2)
        self.upscale = [ScaleBlock(dtype, param_dtype, name=f"upscale_{i}") for i in range(num_upscale)]

    def predict(self, tokens: Array, grid: tuple[int, int]) -> tuple[Array, Array]:
        """(class logits (B, Q, K+1), mask logits (B, Q, h * 2^n, w * 2^n)) from tokens after the norm."""
        queries = tokens[:, :self.num_queries]
        class_logits = self.class_head(queries)
        embedding = queries
        for i, layer in enumerate(self.mask_head):
            embedding = layer(embedding)
            if i < len(self.mask_head) - 1:
                embedding = nn.gelu(embedding, approximate=False)
        patches = tokens[:, self.num_queries + self.vit.num_prefix_tokens:]
        features = patches.reshape(patches.shape[0], *grid, patches.shape[-1])
        for block in self.upscale:
            features = block(features)
        mask_logits = jnp.einsum("bqc,bhwc->bqhw", embedding, features)
        return class_logits, mask_logits

    def attention_mask(self, mask_logits: Array, grid: tuple[int, int], prob: Array,
                       uniform: Array) -> Array:
        """Boolean (B, N, N) mask, True = may attend: queries see a patch only where the mask logit,
        bilinearly resized to the patch grid, is > 0, unless their row is released (uniform > prob).
        Every other entry (query->query, query->prefix, all prefix and patch rows) stays True."""
        batch = mask_logits.shape[0]
        q, prefix = self.num_queries, self.vit.num_prefix_tokens
        on_grid = resize(jax.lax.stop_gradient(mask_logits), grid, method="bilinear", axes=(-2, -1))
        query_to_patch = (on_grid.reshape(batch, q, -1) > 0) | (uniform > prob)[:, :, None]
        num_tokens = q + prefix + grid[0] * grid[1]
        query_rows = jnp.concatenate([jnp.ones((batch, q, q + prefix), bool), query_to_patch], axis=2)
        other_rows = jnp.ones((batch, num_tokens - q, num_tokens), bool)
        return jnp.concatenate([query_rows, other_rows], axis=1)

    def __call__(self, images: Array, attn_mask_probs: Array | None = None, *,
                 train: bool = False) -> dict[str, Array]:
        """Segments `images` (B, H, W, 3).

        Args:
          attn_mask_probs: (L2,) probability that a query is masked in each query block. Given, masked
            attention is on and every block's prediction is returned (needs a "masking" rng stream when
            any value is below 1); None, plain attention and only the final prediction.
          train: dropout / stochastic depth (needs a "dropout" rng).

        Returns:
          {"class_logits": (P, B, Q, K+1), "mask_logits": (P, B, Q, H/4, W/4)} with P = L2 + 1
          predictions (from the input of each query block, then the final output) or P = 1.
        """
        vit = self.vit
        grid = vit.check_images(images)
        if self.normalize_input:
            check_unit_range(images)
            images = normalize(images)
        masked = attn_mask_probs is not None
        first = vit.depth - self.num_query_blocks
        if masked:
            attn_mask_probs = jnp.asarray(attn_mask_probs, jnp.float32)
            if attn_mask_probs.shape != (self.num_query_blocks,):
                raise UserError(f"attn_mask_probs must have shape ({self.num_query_blocks},), one per query "
                                f"block, got {attn_mask_probs.shape}")
        x = vit.embed(images, train=train)
        rope = vit.rope_tables(grid, train=train)
        predictions = []
        for i, block in enumerate(vit.blocks):
            mask = None
            if i == first:
                queries = jnp.broadcast_to(self.queries.astype(x.dtype)[None],
                                           (x.shape[0],) + self.queries.shape)
                x = jnp.concatenate([queries, x], axis=1)
            if masked and i >= first:
                prediction = self.predict(vit.norm(x), grid)
                predictions.append(prediction)
                uniform = jax.random.uniform(self.make_rng("masking"), (x.shape[0], self.num_queries))
                mask = self.attention_mask(prediction[1], grid, attn_mask_probs[i - first], uniform)
            x, _ = block(x, mask, not train, False, rope)
        predictions.append(self.predict(vit.norm(x), grid))
        return {"class_logits": jnp.stack([p[0] for p in predictions]),
                "mask_logits": jnp.stack([p[1] for p in predictions])}
