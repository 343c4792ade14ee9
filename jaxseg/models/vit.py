"""The one Vision Transformer of jaxseg (Flax linen), numerically equal to timm's `VisionTransformer`
for the DeiT and DINOv2 (with registers, LayerScale, SwiGLU) families, and to transformers'
`DINOv3ViTModel` for DINOv3 (axial RoPE on the patch tokens instead of an absolute position embedding,
no key bias, storage/register tokens, LayerScale, GELU or SwiGLU MLPs).

Submodule and parameter names mirror timm's (`patch_embed`, `cls_token`, `reg_token`, `pos_embed`,
`blocks_{i}/{norm1,attn/{query,key,value,out},ls1,norm2,mlp/{fc1,fc2},ls2}`, `norm`) so that the
converters in `jaxseg.convert` are short and readable.

Methods that need more than a forward pass (EoMT's per-block masked attention, WeakTr's per-layer
attention maps) either pass `extra_tokens` / `attention_mask` / `return_attention` to `__call__`, or
drive the pieces themselves from a parent module: `embed`, `blocks[i]` and `norm`.

Sharding: parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `norm`) and activations
logical constraints (`act_batch`, `act_len`, `act_embed`, `act_heads`, `act_kv`, `act_mlp`); a rules table
(see `jaxseg.parallel`) maps them to mesh axes. Nothing here names a mesh axis.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError
from jaxseg.ops.posemb import resample_posemb
from jaxseg.ops.rope import apply_rope, augment_coordinates, patch_coordinates, rope_tables

Array = jax.Array
Dtype = Any

# Width, depth, heads and MLP width of the standard sizes. For SwiGLU (ViT-g) `mlp_dim` is the width of
# each of the two branches (timm's packed fc1 is twice as wide).
SIZES = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "g": dict(width=1536, depth=40, num_heads=24, mlp_dim=4096, mlp_type="swiglu"),
    # DINOv3's SwiGLU sizes: its FFN width is 2/3 of ffn_ratio * width, rounded up to a multiple of 8
    # (of 64 for 7B).
    "S+": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, mlp_type="swiglu"),
    "L+": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, mlp_type="swiglu"),
    "H+": dict(width=1280, depth=32, num_heads=20, mlp_dim=5120, mlp_type="swiglu"),
    "7B": dict(width=4096, depth=40, num_heads=32, mlp_dim=8192, mlp_type="swiglu"),
}

# The token layout, norms and pretraining grid of each checkpoint family, as timm defines them.
FAMILIES = {
    # DeiT / classic timm: posemb covers the class token, 224 px pretraining, no LayerScale.
    "deit": dict(num_registers=0, posemb_covers_prefix=True, layerscale_init=None, pretrain_size=224),
    # DINOv2: LayerScale, 518 px pretraining (37x37 grid at patch 14). Without registers timm keeps
    # the release layout (a class entry in the posemb); with registers the posemb covers patches only.
    "dinov2": dict(num_registers=0, posemb_covers_prefix=True, layerscale_init=1e-5, pretrain_size=518),
    "dinov2_reg": dict(num_registers=4, posemb_covers_prefix=False, layerscale_init=1e-5,
                       pretrain_size=518),
    # DINOv3 (facebookresearch/dinov3 hub models): RoPE with base 100 and coordinates rescaled by a
    # log-uniform factor in [1/2, 2] in training, 4 storage tokens, the key bias masked to 0, eps 1e-5.
    "dinov3": dict(num_registers=4, posemb_covers_prefix=False, layerscale_init=1e-5, key_bias=False,
                   layernorm_eps=1e-5, rope_base=100.0, rope_shift=None, rope_jitter=None, rope_rescale=2.0,
                   pretrain_size=224),
}


def vit_config(variant: str, family: str = "deit", **overrides) -> dict:
    """Keyword arguments of `ViT` for a named variant, e.g. `vit_config("L/14", "dinov2_reg")`.

    `variant` is "<size>/<patch>" with size in SIZES. The position-embedding grid is the pretraining
    grid of the family at that patch size (pass `posemb_grid` to override it); RoPE families (DINOv3)
    store no position embedding.
    """
    try:
        size, patch = variant.split("/")
        config = dict(SIZES[size], patch_size=int(patch))
    except (ValueError, KeyError):
        raise UserError(f"variant must look like 'S/16' with a size in {sorted(SIZES)}, "
                        f"got {variant!r}") from None
    if family not in FAMILIES:
        raise UserError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    family_config = dict(FAMILIES[family])
    grid = family_config.pop("pretrain_size") // config["patch_size"]
    config.update(family_config, posemb_grid=(grid, grid))
    unknown = set(overrides) - set(_VIT_FIELDS)
    if unknown:
        raise UserError(f"unknown ViT option(s) {sorted(unknown)}; valid: {sorted(_VIT_FIELDS)}")
    config.update(overrides)
    return config


def _dense_init(axes: Sequence[str | None]):
    # timm initialises every Linear with trunc_normal(std=0.02) and zero bias.
    return nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), tuple(axes))


def _zeros(axes: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros(("norm",)))


class LayerScale(nn.Module):
    init_value: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param(
            "gamma", nn.with_logical_partitioning(nn.initializers.constant(self.init_value), ("embed",)),
            (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per example, rescaling kept ones by 1/keep."""
    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head self-attention with an optional boolean mask (True = may attend) and optional RoPE
    tables (cos, sin) for the trailing patch tokens (`jaxseg.ops.rope`).

    Returns the sub-layer output (after the output projection, before any residual) and, when asked,
    the softmax probabilities (B, heads, N, N) in float32.
    """
    num_heads: int
    qkv_bias: bool = True
    key_bias: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, deterministic: bool = True,
                 return_probs: bool = False,
                 rope: tuple[Array, Array] | None = None) -> tuple[Array, Array | None]:
        width = x.shape[-1]
        if width % self.num_heads:
            raise UserError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        if mask is not None and mask.shape != (x.shape[0], x.shape[1], x.shape[1]):
            raise UserError(f"attention mask must have shape (batch, tokens, tokens) = "
                            f"{(x.shape[0], x.shape[1], x.shape[1])}, got {mask.shape}")

        # nn.Einsum creates kernels in their final shape, which the logical boxes need (DenseGeneral
        # initialises a flattened kernel and fails to constrain it under a mesh).
        def projection(name):
            use_bias = self.qkv_bias and (self.key_bias or name != "key")
            return nn.Einsum(
                (width, self.num_heads, head_dim), "bnd,dhk->bnhk", use_bias=use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_dense_init(("embed", "heads", "kv")), bias_init=_zeros(("heads", "kv")),
                name=name)

        head_axes = ("act_batch", "act_len", "act_heads", "act_kv")
        q, k, v = (nn.with_logical_constraint(projection(n)(x), head_axes)
                   for n in ("query", "key", "value"))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scale = head_dim ** -0.5
        probs = None
        if return_probs or (self.dropout_rate > 0.0 and not deterministic):
            # timm scales q before the product; the softmax runs in float32 whatever the compute dtype.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
            logits = logits.astype(jnp.float32)
            if mask is not None:
                logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1)
            weights = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
            y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            # Same numbers without materialising the probabilities; fused kernels where available.
            y = jax.nn.dot_product_attention(
                q, k, v, mask=None if mask is None else mask[:, None], scale=scale)
        y = nn.with_logical_constraint(y, head_axes)
        y = nn.Einsum(
            (self.num_heads, head_dim, width), "bnhk,hkd->bnd", dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=_dense_init(("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)), name="out")(y)
        return y, probs


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2, or SwiGLU (silu(fc1_gate) * fc1_up -> fc2) as in timm's
    `SwiGLUPacked` used by DINOv2 ViT-g, or OpenAI CLIP's QuickGELU x * sigmoid(1.702 x) between fc1 and
    fc2."""
    hidden_dim: int
    mlp_type: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, features, axes, name):
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_dense_init(axes), bias_init=_zeros(axes[-1:]), name=name)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        hidden_axes = ("act_batch", "act_len", "act_mlp")
        if self.mlp_type == "gelu":
            h = nn.gelu(self._dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x), approximate=False)
        elif self.mlp_type == "quick_gelu":
            h = self._dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x)
            h = h * nn.sigmoid(1.702 * h)
        elif self.mlp_type == "swiglu":
            gate = self._dense(self.hidden_dim, ("embed", "mlp"), "fc1_gate")(x)
            up = self._dense(self.hidden_dim, ("embed", "mlp"), "fc1_up")(x)
            h = nn.silu(gate) * up
        else:
            raise UserError(f"mlp_type must be 'gelu', 'quick_gelu' or 'swiglu', got {self.mlp_type!r}")
        h = nn.with_logical_constraint(h, hidden_axes)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        y = self._dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
    num_heads: int
    mlp_dim: int
    mlp_type: str = "gelu"
    qkv_bias: bool = True
    key_bias: bool = True
    layerscale_init: float | None = None
    layernorm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.norm1 = _layer_norm(self.layernorm_eps, self.dtype, self.param_dtype)
        self.attn = Attention(self.num_heads, self.qkv_bias, self.key_bias, self.attention_dropout_rate,
                              self.dtype, self.param_dtype)
        self.norm2 = _layer_norm(self.layernorm_eps, self.dtype, self.param_dtype)
        self.mlp = Mlp(self.mlp_dim, self.mlp_type, self.dropout_rate, self.dtype, self.param_dtype)
        if self.layerscale_init is not None:
            self.ls1 = LayerScale(self.layerscale_init, self.param_dtype)
            self.ls2 = LayerScale(self.layerscale_init, self.param_dtype)
        self.drop_path = DropPath(self.drop_path_rate)
        self.dropout = nn.Dropout(self.dropout_rate)

    def attention_probs(self, x: Array, mask: Array | None = None,
                        rope: tuple[Array, Array] | None = None) -> Array:
        """This block's softmax attention (B, heads, N, N) for block input `x` (inference mode); lets a
        caller recompute the maps layer by layer instead of keeping every layer's."""
        return self.attn(self.norm1(x), mask, True, True, rope)[1]

    def __call__(self, x: Array, mask: Array | None = None, deterministic: bool = True,
                 return_attention: bool = False,
                 rope: tuple[Array, Array] | None = None) -> tuple[Array, dict]:
        """Returns the block output and {"attn_out": (B, N, D) attention sub-layer output (after the
        output projection, before LayerScale and the residual)}, plus "attn_probs" (B, heads, N, N) with
        `return_attention`. `rope`: the ViT's `rope_tables` for its patch grid, or None."""
        attn_out, probs = self.attn(self.norm1(x), mask, deterministic, return_attention, rope)
        y = self.dropout(attn_out, deterministic=deterministic)
        if self.layerscale_init is not None:
            y = self.ls1(y)
        x = x + self.drop_path(y, deterministic)
        y = self.mlp(self.norm2(x), deterministic)
        if self.layerscale_init is not None:
            y = self.ls2(y)
        x = x + self.drop_path(y, deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        aux = {"attn_out": attn_out}
        if return_attention:
            aux["attn_probs"] = probs
        return x, aux


class ViT(nn.Module):
    """Vision Transformer over NHWC images.

    Attributes:
      width, depth, num_heads, mlp_dim: the size (see `SIZES`).
      patch_size: side of the square patches (the conv stem's kernel and stride).
      posemb_grid: (rows, cols) of the stored position embedding; other input grids resample it at call
        time, as `posemb_resize` says: "timm" (bicubic + antialias, `resample_abs_pos_embed`), "dino"
        (DINO's `interpolate_pos_encoding`, used by MCTformer / WeakTr) or "bilinear" (Segmenter's
        `resize_pos_embed`); see `resample_posemb`.
      num_cls_tokens: class tokens (0, 1, or one per class for WeakTr).
      num_registers: register tokens (DINOv2 with registers: 4).
      posemb_covers_prefix: True if the position embedding has entries for the class/register tokens
        (DeiT, timm classic); False if it covers patches only (DINOv2's `no_embed_class`).
      rope_base: None for the learned absolute position embedding; a number for DINOv3's axial RoPE with
        that base period (no `pos_embed` parameter, `posemb_grid` unused). See `jaxseg.ops.rope`.
      rope_normalize: how patch coordinates span [-1, 1]: "separate" (per axis), "min" or "max" side.
      rope_shift / rope_jitter / rope_rescale: DINOv3's training-time coordinate augmentation (a uniform
        shift, per-axis and joint log-uniform scales), drawn once per forward pass from the "dropout" rng;
        None switches each off.
      layerscale_init: LayerScale initial value, or None for no LayerScale.
      mlp_type: "gelu" (exact erf), "quick_gelu" (OpenAI CLIP) or "swiglu".
      qkv_bias / key_bias: biases of the query, key and value projections; DINOv3 keeps its key bias at
        0 (key_bias=False).
      pre_norm: a LayerNorm `norm_pre` on the embedded tokens, before the first block (CLIP's `ln_pre`);
        as in timm, such a ViT's patch embedding has no bias.
      final_norm: apply the final LayerNorm `norm` to the encoded tokens.
      dtype / param_dtype: compute and parameter dtypes (e.g. bfloat16 compute with float32 params).
      remat: rematerialise each block in the backward pass (saves activation memory).
    """
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 16
    posemb_grid: tuple[int, int] = (14, 14)
    posemb_resize: str = "timm"
    in_channels: int = 3
    num_cls_tokens: int = 1
    num_registers: int = 0
    posemb_covers_prefix: bool = True
    rope_base: float | None = setting(None, "> 0")
    rope_normalize: str = "separate"
    rope_shift: float | None = setting(None, ">= 0")
    rope_jitter: float | None = setting(None, ">= 1")
    rope_rescale: float | None = setting(None, ">= 1")
    layerscale_init: float | None = None
    mlp_type: str = "gelu"
    qkv_bias: bool = True
    key_bias: bool = True
    layernorm_eps: float = 1e-6
    pre_norm: bool = False
    final_norm: bool = True
    drop_path_rate: float = setting(0.0, "in [0, 1]")
    dropout_rate: float = setting(0.0, "in [0, 1]")
    attention_dropout_rate: float = setting(0.0, "in [0, 1]")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def __post_init__(self):
        check_rules(self)
        super().__post_init__()

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def num_posemb_prefix(self) -> int:
        """Entries of the position embedding in front of the patch grid."""
        return self.num_prefix_tokens if self.posemb_covers_prefix else 0

    def setup(self):
        embed_axes = (None, None, "embed")
        self.patch_embed = nn.Conv(
            self.width, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
            padding="VALID", use_bias=not self.pre_norm, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, None, "embed")),
            bias_init=_zeros(("embed",)))
        tiny_normal = nn.with_logical_partitioning(nn.initializers.normal(1e-6), embed_axes)
        if self.num_cls_tokens:
            self.cls_token = self.param("cls_token", tiny_normal, (1, self.num_cls_tokens, self.width),
                                        self.param_dtype)
        if self.num_registers:
            self.reg_token = self.param("reg_token", tiny_normal, (1, self.num_registers, self.width),
                                        self.param_dtype)
        if self.rope_base is None:
            num_pos = math.prod(self.posemb_grid) + self.num_posemb_prefix
            self.pos_embed = self.param(
                "pos_embed", nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), embed_axes),
                (1, num_pos, self.width), self.param_dtype)
        # deterministic and return_attention select code paths, so remat must treat them as static.
        block_cls = nn.remat(Block, static_argnums=(3, 4)) if self.remat else Block
        drop_path_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [
            block_cls(self.num_heads, self.mlp_dim, self.mlp_type, self.qkv_bias, self.key_bias,
                      self.layerscale_init, self.layernorm_eps, float(rate), self.dropout_rate,
                      self.attention_dropout_rate, self.dtype, self.param_dtype)
            for rate in drop_path_rates]
        if self.pre_norm:
            self.norm_pre = _layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_pre")
        if self.final_norm:
            self.norm = _layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")
        self.pos_drop = nn.Dropout(self.dropout_rate)

    def check_images(self, images: Array) -> tuple[int, int]:
        """Raises a ValueError naming the problem for a malformed batch; returns the patch grid."""
        if images.ndim != 4:
            raise UserError(f"images must be (batch, height, width, channels), got shape {images.shape}")
        _, height, width, channels = images.shape
        if channels != self.in_channels:
            raise UserError(f"images have {channels} channels, the ViT expects {self.in_channels} "
                            f"(layout is NHWC: (batch, height, width, channels))")
        if height % self.patch_size or width % self.patch_size:
            raise UserError(f"image size {height}x{width} is not divisible by the patch size "
                            f"{self.patch_size}; resize or pad the input")
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: tuple[int, int], square_input: bool = True) -> Array:
        """The position embedding for a patch grid: (1, num_posemb_prefix + rows*cols, D); `square_input`:
        see `resample_posemb`."""
        return resample_posemb(self.pos_embed, self.posemb_grid, grid, self.num_posemb_prefix,
                               self.posemb_resize, square_input)

    def rope_tables(self, grid: tuple[int, int], *, train: bool = False) -> tuple[Array, Array] | None:
        """RoPE (cos, sin), each (rows*cols, head_dim) float32, for a patch grid; None without RoPE. Pass
        them to every block of one forward pass."""
        if self.rope_base is None:
            return None
        coords = patch_coordinates(grid, self.rope_normalize)
        if train and any(v is not None for v in (self.rope_shift, self.rope_jitter, self.rope_rescale)):
            coords = augment_coordinates(coords, self.make_rng("dropout"), shift=self.rope_shift,
                                         jitter=self.rope_jitter, rescale=self.rope_rescale)
        return rope_tables(coords, self.width // self.num_heads, self.rope_base)

    def embed(self, images: Array, *, train: bool = False, input_size: tuple[int, int] | None = None) -> Array:
        """Patch embedding + class/register tokens + position embedding (then `norm_pre` with
        `pre_norm`): (B, prefix + patches, D), token order [cls..., registers..., patches (row-major)].
        `input_size`: (height, width) of the images before they were cut to whole patches, if they were
        (the "dino" position embedding depends on it)."""
        grid = self.check_images(images)
        height, width = input_size or images.shape[1:3]
        x = self.patch_embed(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width)
        prefix = [jnp.broadcast_to(t, (x.shape[0],) + t.shape[1:]).astype(self.dtype)
                  for t in (getattr(self, "cls_token", None), getattr(self, "reg_token", None))
                  if t is not None]
        if self.rope_base is not None:
            x = jnp.concatenate(prefix + [x], axis=1)
        elif self.posemb_covers_prefix:
            x = jnp.concatenate(prefix + [x], axis=1) + self.position_embedding(grid, height == width).astype(x.dtype)
        else:
            x = jnp.concatenate(prefix + [x + self.position_embedding(grid, height == width).astype(x.dtype)], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        x = self.pos_drop(x, deterministic=not train)
        # After the position dropout, as timm orders them.
        return self.norm_pre(x) if self.pre_norm else x

    def __call__(self, images: Array, *, train: bool = False,
                 extra_tokens: Mapping[int, Array] | None = None,
                 attention_mask: Array | Mapping[int, Array] | None = None,
                 return_attention: bool = False) -> tuple[Array, dict]:
        """Encodes `images` (B, H, W, C).

        Args:
          train: enables dropout and stochastic depth (needs a "dropout" rng).
          extra_tokens: {block index: (B or 1, n, D)} tokens prepended to the sequence right before that
            block (e.g. EoMT queries); later blocks and the output keep them in front.
          attention_mask: a boolean (B, N, N) mask for every block, or {block index: mask} for some
            blocks; True = may attend. N counts the extra tokens present at that block.
          return_attention: also return each block's softmax probabilities and attention output.

        Returns:
          (encoded tokens (B, N, D) after the final norm if any, intermediates dict) with "embedded"
          (tokens entering block 0), "blocks" (list of each block's output) and, with
          `return_attention`, "attn_probs" and "attn_out" (lists over blocks).
        """
        extra_tokens = dict(extra_tokens or {})
        bad = [i for i in extra_tokens if not 0 <= i < self.depth]
        if bad:
            raise UserError(f"extra_tokens block indices {bad} are outside 0..{self.depth - 1}")
        if attention_mask is not None and not isinstance(attention_mask, Mapping):
            attention_mask = {i: attention_mask for i in range(self.depth)}
        attention_mask = attention_mask or {}

        x = self.embed(images, train=train)
        rope = self.rope_tables(self.check_images(images), train=train)
        out = {"embedded": x, "blocks": []}
        if return_attention:
            out["attn_probs"], out["attn_out"] = [], []
        for i, block in enumerate(self.blocks):
            if i in extra_tokens:
                tokens = extra_tokens[i].astype(self.dtype)
                if tokens.ndim != 3 or tokens.shape[-1] != self.width:
                    raise UserError(f"extra_tokens[{i}] must be (batch or 1, n, {self.width}), "
                                    f"got {tokens.shape}")
                tokens = jnp.broadcast_to(tokens, (x.shape[0],) + tokens.shape[1:])
                x = jnp.concatenate([tokens, x], axis=1)
            x, aux = block(x, attention_mask.get(i), not train, return_attention, rope)
            out["blocks"].append(x)
            if return_attention:
                out["attn_probs"].append(aux["attn_probs"])
                out["attn_out"].append(aux["attn_out"])
        if self.final_norm:
            x = self.norm(x)
        return x, out


_VIT_FIELDS = tuple(f for f in ViT.__dataclass_fields__ if f not in ("parent", "name"))
