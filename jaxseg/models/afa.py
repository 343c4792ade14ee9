"""AFA, affinity from attention (Ru et al., "Learning Affinity from Attention: End-to-End Weakly-Supervised
Semantic Segmentation with Transformers", CVPR 2022; rulixiang/afa), on the plain jaxseg ViT.

Three heads on one encoder, trained together from image-level labels (`jaxseg.methods.afa`):
  classification  a bias-free linear map (the official 1x1 conv) of the globally max- (or average-) pooled
                  patch tokens after the final norm: C foreground logits; the same map on every token is
                  the CAM (B, C, h, w);
  affinity        the raw attention logits q . k^T of the patch tokens (before the 1/sqrt(d) scale and the
                  softmax, as the official MiT returns `attn_`) of the last `affinity_layers` blocks, every
                  head a map: symmetrised (S + S^T), a 1x1 conv over the maps (a weight per layer and head
                  and a bias), a sigmoid: the predicted affinity (B, P, P) of the P patches;
  segmentation    ToCo's LargeFOV on the patch tokens (two dilated bias-free 3x3 convs with ReLU, a
                  bias-free 1x1 to C + 1 classes, background first), at patch resolution.
The official backbone is SegFormer's MiT-B1, whose affinity reads the 2 blocks of its last stage (16 maps)
and whose segmentation head is SegFormer's MLP over its 4 stages; a plain ViT has one resolution, so here
any number of blocks feeds the affinity (default: all) and the head is the one the authors put on a plain
ViT in their follow-up ToCo (width 512, dilation 5). Gradients of the affinity loss reach the attention of
every block they read (the official does not detach them).

The attention logits are recomputed from each block's input with the block's own `norm1` and query / key
parameters (the ViT returns only softmax probabilities); the conv over the maps is linear, so it sums the
layers' weighted maps one layer at a time, F = sum_{l,h} w_lh S_lh, and the affinity is sigmoid(F + F^T + b).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.initializers import torch_default
from jaxseg.models.vit import Block, ViT

Array = jax.Array
POOLINGS = ("gmp", "gap")


def attention_logits(block: Block, x: Array, prefix: int) -> Array:
    """q . k^T (B, heads, P, P) in float32 among the patch tokens (after the `prefix` class / register
    tokens) of `block` for its input `x` (B, prefix + P, D): no scale, no softmax, no mask."""
    params = nn.meta.unbox(block.variables["params"]["attn"])  # boxed with logical axes while initialising
    normed = block.norm1(x)[:, prefix:]

    def project(name):
        y = jnp.einsum("bnd,dhk->bnhk", normed, params[name]["kernel"].astype(normed.dtype))
        return y + params[name]["bias"].astype(y.dtype) if "bias" in params[name] else y
    return jnp.einsum("bqhd,bkhd->bhqk", project("query"), project("key")).astype(jnp.float32)


class AffinityHead(nn.Module):
    """sigmoid(conv1x1(concat_l (S_l + S_l^T))) over per-layer logits [(B, heads, P, P)] -> (B, P, P). The
    kernel (layers * heads,) is ordered layer-major, as the official concatenates the blocks' maps; its init
    is the official kaiming normal (a = sqrt(5), fan_out = 1), the bias PyTorch's default."""

    @nn.compact
    def __call__(self, logits: list[Array]) -> Array:
        heads = logits[0].shape[1]
        maps = len(logits) * heads
        kernel = self.param("kernel", nn.initializers.normal((2 / (1 + 5)) ** 0.5), (maps,))
        bias = self.param("bias", torch_default(maps), (1,))
        fused = sum(jnp.einsum("bhij,h->bij", layer, kernel[i * heads:(i + 1) * heads])
                    for i, layer in enumerate(logits))
        return nn.sigmoid(fused + jnp.swapaxes(fused, 1, 2) + bias[0])


class LargeFov(nn.Module):
    """ToCo's LargeFOV: conv3x3 (dilation d) -> ReLU -> conv3x3 (dilation d) -> ReLU -> conv1x1, all
    bias-free, PyTorch's default init. (B, h, w, D) -> (B, h, w, num_classes)."""
    num_classes: int
    width: int = 512
    dilation: int = 5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.dilation
        for name, fan_in in (("conv6", x.shape[-1]), ("conv7", self.width)):
            x = nn.relu(nn.Conv(self.width, (3, 3), padding=d, kernel_dilation=d, use_bias=False,
                                kernel_init=torch_default(9 * fan_in), name=name)(x))
        return nn.Conv(self.num_classes, (1, 1), use_bias=False, kernel_init=torch_default(self.width),
                       name="conv8")(x)


class Afa(nn.Module):
    """AFA network (module docstring).

    Attributes:
      encoder: ViT keyword arguments (a learned position embedding; the final norm is applied if set).
      num_classes: C, the foreground classes (the segmentation head has C + 1 outputs, background 0).
      pooling: "gmp" (the official default) or "gap" of the patch tokens for the class logits.
      affinity_layers: how many of the last blocks feed the affinity head; None: all.
      decoder_width, decoder_dilation: LargeFOV's (512, 5 in ToCo).
    """
    encoder: dict
    num_classes: int
    pooling: str = "gmp"
    affinity_layers: int | None = None
    decoder_width: int = 512
    decoder_dilation: int = 5

    def setup(self):
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.vit = ViT(**self.encoder, name="encoder")
        if self.vit.rope_base is not None:
            raise UserError("AFA recomputes the attention logits without position tables: use an encoder with a "
                            "learned position embedding (rope_base=None)")
        layers = self.vit.depth if self.affinity_layers is None else self.affinity_layers
        if not 1 <= layers <= self.vit.depth:
            raise UserError(f"affinity_layers must lie in [1, {self.vit.depth}] (the encoder's depth), got {layers}")
        self.layers = layers
        self.classifier = self.param("classifier", torch_default(self.vit.width), (self.vit.width, self.num_classes))
        self.affinity_head = AffinityHead(name="affinity")
        self.decoder = LargeFov(self.num_classes + 1, self.decoder_width, self.decoder_dilation, name="decoder")

    def encode(self, images: Array, *, train: bool = False, affinity: bool = True) -> tuple[Array, Array | None]:
        """(patch tokens (B, h, w, D) after the final norm if any, affinity (B, P, P) or None)."""
        vit = self.vit
        grid = vit.check_images(images)
        tokens, out = vit(images, train=train)
        prediction = None
        if affinity:
            inputs = [out["embedded"]] + out["blocks"][:-1]
            logits = [attention_logits(vit.blocks[i], inputs[i], vit.num_prefix_tokens)
                      for i in range(vit.depth - self.layers, vit.depth)]
            prediction = self.affinity_head(logits)
        features = tokens[:, vit.num_prefix_tokens:].reshape(tokens.shape[0], *grid, vit.width)
        return features, prediction

    def cams(self, images: Array, *, affinity: bool = False) -> tuple[Array, Array | None]:
        """The CAM pass (inference mode): (CAMs (B, C, h, w) without ReLU, affinity (B, P, P) or None)."""
        features, prediction = self.encode(images, affinity=affinity)
        return jnp.einsum("bhwd,dc->bchw", features, self.classifier.astype(features.dtype)), prediction

    def segment(self, images: Array) -> Array:
        """The segmentation pass (inference mode): logits (B, h, w, C + 1) at patch resolution."""
        return self.decoder(self.encode(images, affinity=False)[0])

    def __call__(self, images: Array, *, train: bool = False) -> dict[str, Array]:
        """images (B, H, W, 3), H and W multiples of the patch -> {"cls_logits": (B, C), "cams": (B, C, h, w),
        "seg_logits": (B, h, w, C + 1) at patch resolution, "affinity": (B, P, P)}."""
        features, prediction = self.encode(images, train=train)
        pooled = features.max((1, 2)) if self.pooling == "gmp" else features.mean((1, 2))
        classifier = self.classifier.astype(features.dtype)
        return {"cls_logits": pooled @ classifier, "cams": jnp.einsum("bhwd,dc->bchw", features, classifier),
                "seg_logits": self.decoder(features), "affinity": prediction}
