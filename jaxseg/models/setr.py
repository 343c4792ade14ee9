"""SETR (Zheng et al., CVPR 2021): a plain ViT whose intermediate block outputs feed a convolutional
decoder, as mmsegmentation implements it for the official configs (`mmseg/models/decode_heads/
setr_up_head.py`, `setr_mla_head.py`, `mmseg/models/necks/mla_neck.py`, the backbone `VisionTransformer`
with `out_indices` and `final_norm=False`).

The encoder runs as mmseg's ViT: class token and position embedding added, then, with
`with_cls_token=False` (mmseg's MLA configs), the prefix tokens are dropped before the first block; the
taps are the raw outputs of the blocks in `taps` (after the final norm only for the last block, and only
with the encoder's `final_norm`), patch tokens as (B, h, w, D) maps.

Decoders (every conv is mmcv's `ConvModule`: conv without bias -> BatchNorm -> ReLU):
  naive  the last tap: LayerNorm -> 1x1 conv -> x4 bilinear -> 1x1 classifier (SETRUPHead, num_convs=1);
  pup    the last tap: LayerNorm -> 4 x [3x3 conv -> x2 bilinear] -> 1x1 classifier (num_convs=4);
  mla    every tap: LayerNorm -> 1x1 conv; top-down running sums from the deepest tap; a 3x3 conv on each
         sum (MLANeck); then per stream two 3x3 convs -> x4 bilinear, concatenated -> 1x1 classifier
         (SETRMLAHead).
The logits are then resized bilinearly to the input size (mmseg's `EncoderDecoder`), align_corners=False
throughout. The auxiliary heads of the official configs (CE weight 0.4 on other taps) only add training
losses and are not included.

BatchNorm is torch's (`BatchNorm`): in training it normalises with the batch statistics (over the global
batch under jit, as SyncBN) and, when the "batch_stats" collection is mutable, moves the running
statistics (momentum 0.1, unbiased variance); in inference it uses the running statistics.
"""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError
from jaxseg.models.vit import ViT
from jaxseg.ops.resize import resize

Array = jax.Array
DECODERS = ("naive", "pup", "mla")
# mmseg's SETRUPHead settings (num_convs, up_scale, kernel_size) of the official naive and PUP configs.
_UP_HEADS = {"naive": (1, 4, 1), "pup": (4, 2, 3)}


class BatchNorm(nn.Module):
    """torch's BatchNorm2d over the last axis: `scale`, `bias` params; running `mean`, `var` in the
    "batch_stats" collection (torch's momentum convention: new = (1 - momentum) old + momentum batch)."""
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (features,))
        bias = self.param("bias", nn.initializers.zeros_init(), (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                count = x.size // features
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = ((1 - self.momentum) * running_var.value
                                     + self.momentum * var * count / max(count - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ConvModule(nn.Module):
    """mmcv ConvModule with a norm: square conv (same padding, no bias, kaiming-normal fan-out init as
    mmcv's) -> BatchNorm -> ReLU."""
    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        pad = (self.kernel_size - 1) // 2
        x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                    use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x, train))


def upsample(x: Array, factor: int) -> Array:
    """mmseg's `Upsample(scale_factor=factor)`: bilinear to the integer size factor x (h, w)."""
    return resize(x, (x.shape[1] * factor, x.shape[2] * factor), method="bilinear")


def _classifier(num_classes: int) -> nn.Conv:
    # mmseg's `conv_seg`: 1x1 conv with bias, weights N(0, 0.01).
    return nn.Conv(num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01), name="conv_seg")


class UpHead(nn.Module):
    """mmseg's SETRUPHead (naive and PUP): (B, h, w, D) tap -> (B, h s^n, w s^n, N) logits."""
    num_classes: int
    channels: int
    num_convs: int
    up_scale: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        for i in range(self.num_convs):
            x = upsample(ConvModule(self.channels, self.kernel_size, name=f"up_convs_{i}")(x, train), self.up_scale)
        return _classifier(self.num_classes)(x)


class MlaNeck(nn.Module):
    """mmseg's MLANeck: taps (shallow to deep) -> as many (B, h, w, channels) maps, the first from the
    deepest tap alone, each next one adding the next shallower tap (mmseg's order)."""
    channels: int

    @nn.compact
    def __call__(self, taps: list[Array], train: bool) -> list[Array]:
        projected = [ConvModule(self.channels, 1, name=f"channel_proj_{i}")(
            nn.LayerNorm(epsilon=1e-6, name=f"norm_{i}")(x), train) for i, x in enumerate(taps)]
        sums = itertools.accumulate(reversed(projected))
        return [ConvModule(self.channels, 3, name=f"feat_extract_{i}")(x, train) for i, x in enumerate(sums)]


class MlaHead(nn.Module):
    """mmseg's SETRMLAHead: per neck map two 3x3 ConvModules -> x`up_scale`, concatenated -> classifier."""
    num_classes: int
    mla_channels: int = 128
    up_scale: int = 4

    @nn.compact
    def __call__(self, features: list[Array], train: bool) -> Array:
        streams = []
        for i, x in enumerate(features):
            for j in range(2):
                x = ConvModule(self.mla_channels, 3, name=f"up_convs_{i}_{j}")(x, train)
            streams.append(upsample(x, self.up_scale))
        return _classifier(self.num_classes)(jnp.concatenate(streams, axis=-1))


class Setr(nn.Module):
    """Attributes:
      encoder: ViT keyword arguments (mmseg's SETR backbone has final_norm=False).
      num_classes: N.
      decoder: "naive", "pup" or "mla".
      taps: indices of the blocks the decoder reads, shallow to deep; () = the last block for naive and
        PUP, four evenly spaced ending at the last for MLA (ViT-L: 5, 11, 17, 23, as mmseg). Naive and PUP
        read exactly one.
      with_cls_token: the blocks see the class (and register) tokens; mmseg's MLA configs drop them after
        the position embedding (False).
      channels: naive / PUP conv channels, MLA neck channels (the official configs: 256).
      mla_channels: channels of each MLA head stream (128).
    """
    encoder: dict
    num_classes: int
    decoder: str = "naive"
    taps: tuple[int, ...] = ()
    with_cls_token: bool = True
    channels: int = setting(256, ">= 1")
    mla_channels: int = setting(128, ">= 1")

    def __post_init__(self):
        check_rules(self)
        super().__post_init__()

    def setup(self):
        if self.decoder not in DECODERS:
            raise UserError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        self.vit = ViT(**self.encoder, name="encoder")
        depth = self.vit.depth
        if self.taps:
            self.block_taps = tuple(self.taps)
        elif self.decoder == "mla":
            self.block_taps = tuple(depth * k // 4 - 1 for k in range(1, 5))
        else:
            self.block_taps = (depth - 1,)
        taps = self.block_taps
        if any(not 0 <= t < depth for t in taps) or list(taps) != sorted(set(taps)):
            raise UserError(f"taps must be increasing block indices in 0..{depth - 1}, got {taps}")
        if self.decoder == "mla":
            self.neck = MlaNeck(self.channels, name="neck")
            self.head = MlaHead(self.num_classes, self.mla_channels, name="head")
        else:
            if len(taps) != 1:
                raise UserError(f"the {self.decoder} decoder reads one block, got taps={taps}")
            num_convs, up_scale, kernel_size = _UP_HEADS[self.decoder]
            self.head = UpHead(self.num_classes, self.channels, num_convs, up_scale, kernel_size, name="head")

    def features(self, images: Array, *, train: bool = False) -> list[Array]:
        """The taps: one (B, h, w, D) patch-token map per block of `taps`."""
        grid = self.vit.check_images(images)
        x = self.vit.embed(images, train=train)
        rope = self.vit.rope_tables(grid, train=train)
        prefix = self.vit.num_prefix_tokens
        if not self.with_cls_token:
            x, prefix = x[:, prefix:], 0
        taps = []
        for i, block in enumerate(self.vit.blocks):
            x, _ = block(x, None, not train, False, rope)
            if i == self.vit.depth - 1 and self.vit.final_norm:
                x = self.vit.norm(x)
            if i in self.block_taps:
                taps.append(x[:, prefix:].reshape(x.shape[0], *grid, x.shape[-1]))
        return taps

    def decode(self, taps: list[Array], *, train: bool = False) -> Array:
        """The decoder alone: taps -> logits (B, h', w', N) at the decoder's own resolution."""
        if self.decoder == "mla":
            return self.head(self.neck(taps, train), train)
        return self.head(taps[0], train)

    def __call__(self, images: Array, *, train: bool = False) -> Array:
        """images (B, H, W, C), H and W multiples of the patch size -> logits (B, H, W, N)."""
        logits = self.decode(self.features(images, train=train), train=train)
        return resize(logits, images.shape[1:3], method="bilinear")
