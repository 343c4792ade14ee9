"""WeakTr stage 1: class activation maps from a multi-class-token ViT with Adaptive Attention Fusion.

A DeiT-style ViT with C class tokens (position embedding over class tokens and patches, DINO-style
resampling, no final norm) gives three predictions per image:
  1. class-token logits: the channel mean of each class token's output;
  2. coarse CAM Z = conv3x3(patch tokens) (D -> C), logits = its spatial mean;
  3. fine CAM (WeakTr mode): all K x H attention maps A (layer k, head h) are fused with per-image sigmoid
     weights w from the Adaptive Attention Fusion (AAF) module, Abar = mean_l w_l A_l; the cross
     attention CA = Abar[class rows, patch columns] gates ReLU(stopgrad(Z)) into the fused CAM M, patch
     attention PA = Abar[patch rows, patch columns] refines it, fine = PA @ M, logits = its spatial mean.
AAF sees stop-gradient copies of the maps and of every layer's attention output, so the fine-CAM loss
trains only the AAF. MCTformer mode ("mctformer") replaces AAF by the head mean summed over the last n
layers (CA) and over all layers (PA), and has no fine prediction.
CAM inference reads one of three maps (`select_cam`, the original's `attention_type`): the fused CAM M,
the conv head's ReLU(Z) or the cross attention CA alone. Inputs may have any size of at least one patch:
as the original's stride-p patch embedding, the model drops the pixels beyond whole patches, and the
DINO-style position embedding sees the uncropped size (it resamples for any non-square input).

Memory: keeping K x H maps of (C + P)^2 entries per image is the cost of a naive port. Here each layer's
attention output is pooled as soon as it exists, and the weighted sum of the maps is a scan over the
layers with a rematerialised body: the maps are recomputed from the stored block inputs, one layer at a
time, in the forward and the backward pass (`benchmarks/bench_weaktr.py` measures the saving).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError
from jaxseg.models.initializers import torch_default, torch_dense
from jaxseg.models.vit import ViT

Array = jax.Array
FUSIONS = ("aaf", "mctformer")
# The original's `attention_type` values of CAM inference (`select_cam`).
CAM_KINDS = ("fused", "patchcam", "cross")


class AdaptiveAttentionFusion(nn.Module):
    """Per-image weights (B, L) of the L = K * H attention maps from their pooled features (B, L, d):
    Lin(d -> d/feat_reduction) -> Lin(-> 1) (no activation between, as the original) -> Lin(L -> L/reduction,
    no bias) -> ReLU -> Lin(-> L, no bias) -> sigmoid."""
    feat_reduction: int = 8
    reduction: int = 8

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        num_maps, dim = pooled.shape[1], pooled.shape[2]
        hidden = dim // self.feat_reduction
        e = torch_dense(hidden, dim, "feat_fc1")(pooled)
        e = torch_dense(1, hidden, "feat_fc2")(e)[..., 0]
        squeeze = num_maps // self.reduction
        if squeeze < 1 or hidden < 1:
            raise UserError(f"AAF reductions too large: {num_maps} maps / reduction {self.reduction} and "
                            f"{dim} channels / feat_reduction {self.feat_reduction} must both be >= 1")
        h = nn.relu(torch_dense(squeeze, num_maps, "head_fc1", use_bias=False)(e))
        return nn.sigmoid(torch_dense(num_maps, squeeze, "head_fc2", use_bias=False)(h))


def _fused_layer_attention(vit: ViT, layer: int, inputs: Array, weights: Array) -> Array:
    """sum_h weights[:, h] * A_layer[:, h] for a block input: (B, T, T), without gradients to the maps."""
    probs = jax.lax.stop_gradient(vit.blocks[layer].attention_probs(jax.lax.stop_gradient(inputs)))
    return jnp.einsum("bh,bhij->bij", weights, probs)


def _fused_attention(vit: ViT, inputs: list[Array], weights: Array) -> Array:
    """sum_{k, h} weights[:, h, k] * A_k[:, h] over all layers: (B, T, T). A scan over the layers with a
    rematerialised body keeps one layer's maps at a time in both passes (the maps are recomputed from the
    stored block inputs; only `weights` receives gradients, as in WeakTr)."""
    attention = jax.tree_util.tree_map(
        lambda *leaves: jax.lax.stop_gradient(jnp.stack(leaves)),
        *[{name: block.variables["params"][name] for name in ("norm1", "attn")} for block in vit.blocks])
    block = vit.blocks[0].clone(parent=None)

    @jax.checkpoint
    def add_layer(fused, layer):
        layer_input, layer_weights, params = layer
        probs = block.apply({"params": params}, layer_input, method=block.attention_probs)
        return fused + jnp.einsum("bh,bhij->bij", layer_weights, probs), None

    stacked = jax.lax.stop_gradient(jnp.stack(inputs))
    batch, tokens = stacked.shape[1:3]
    fused, _ = jax.lax.scan(add_layer, jnp.zeros((batch, tokens, tokens), jnp.float32),
                            (stacked, jnp.moveaxis(weights, 2, 0), attention))
    return fused


def select_cam(outputs: dict[str, Array], kind: str) -> Array:
    """The CAM of `kind` (B, C, h, w) from WeakTr's outputs, as the original's `attention_type`: "fused"
    (M = CA * ReLU(Z)), "patchcam" (ReLU(Z), the conv head's) or "cross" (CA, the class-to-patch attention
    alone: AAF-fused over every layer and head, or MCTformer's head mean over the last layers)."""
    if kind not in CAM_KINDS:
        raise UserError(f"the CAM kind must be one of {CAM_KINDS}, got {kind!r}")
    if kind == "patchcam":
        return nn.relu(outputs["coarse_cam"])
    return outputs["fused_cam" if kind == "fused" else "cross_attention"]


class WeakTr(nn.Module):
    """WeakTr / MCTformer CAM network.

    Attributes:
      encoder: ViT keyword arguments; needs `num_cls_tokens == num_classes`, `final_norm=False`
        (stage 1 reads the raw output of the last block) and typically `posemb_resize="dino"`.
      num_classes: C (foreground classes).
      fusion: "aaf" (WeakTr) or "mctformer".
      pool: "max" (WeakTr's scripts) or "avg" pooling of the attention features over tokens.
      feat_reduction, reduction: AAF widths (8 and 8 in WeakTr).
      mctformer_layers: MCTformer sums the cross attention of this many last layers.
    """
    encoder: dict
    num_classes: int
    fusion: str = "aaf"
    pool: str = "max"
    feat_reduction: int = 8
    reduction: int = 8
    mctformer_layers: int = 12

    def setup(self):
        if self.fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.pool not in ("max", "avg"):
            raise UserError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        self.vit = ViT(**self.encoder, name="encoder")
        if self.vit.num_cls_tokens != self.num_classes or self.vit.num_registers:
            raise UserError(f"WeakTr needs one class token per class ({self.num_classes}) and no registers; "
                            f"the encoder has {self.vit.num_cls_tokens} and {self.vit.num_registers}")
        if self.vit.final_norm:
            raise UserError("WeakTr stage 1 uses the last block's raw output: set final_norm=False")
        if self.vit.rope_base is not None:
            raise UserError("WeakTr's fused attention maps are recomputed without position tables: use an "
                            "encoder with a learned position embedding (rope_base=None)")
        # WeakTr's `_init_weights` skips convolutions: the head keeps PyTorch's default init.
        init = torch_default(9 * self.vit.width)
        self.head = nn.Conv(self.num_classes, (3, 3), padding=1, kernel_init=init, bias_init=init)
        if self.fusion == "aaf":
            self.aaf = AdaptiveAttentionFusion(self.feat_reduction, self.reduction)

    def __call__(self, images: Array, *, train: bool = False) -> dict[str, Array]:
        """images (B, H, W, 3) of any size of at least one patch, the pixels beyond whole patches dropped
        (h = H // patch, w = W // patch) -> {"cls_logits", "coarse_logits", ["fine_logits"]: (B, C);
        "coarse_cam": Z (B, C, h, w); "cross_attention": CA (B, C, h, w); "fused_cam": M = CA * ReLU(Z)
        (B, C, h, w); "patch_attention": PA (B, P, P)}."""
        vit, num_classes, patch = self.vit, self.num_classes, self.vit.patch_size
        input_size = images.shape[1:3]
        if images.ndim == 4:  # the original's stride-p patch embedding drops the bottom and right remainder
            images = images[:, :input_size[0] // patch * patch, :input_size[1] // patch * patch]
        grid = vit.check_images(images)
        if 0 in grid:
            raise UserError(f"WeakTr's input of {input_size[0]}x{input_size[1]} pixels is smaller than one "
                            f"{patch} px patch")
        x = vit.embed(images, train=train, input_size=input_size)
        batch, heads, depth = x.shape[0], vit.num_heads, vit.depth
        inputs, pooled = [], []
        for block in vit.blocks:
            inputs.append(x)
            x, aux = block(x, None, not train, False)
            if self.fusion == "aaf":
                # Channel c of the projected attention output goes to pseudo-head c % H (the head index
                # runs fastest), exactly as WeakTr reshapes it; those channels mix every real head.
                features = jax.lax.stop_gradient(aux["attn_out"]).reshape(batch, x.shape[1], -1, heads)
                pooled.append(features.max(1) if self.pool == "max" else features.mean(1))  # (B, d, H)
        tokens_cls, tokens_patch = x[:, :num_classes], x[:, num_classes:]
        coarse = self.head(tokens_patch.reshape(batch, *grid, -1))  # (B, h, w, C)
        coarse_cam = jnp.moveaxis(coarse, -1, 1)
        outputs = {"cls_logits": tokens_cls.mean(-1), "coarse_logits": coarse.mean((1, 2)),
                   "coarse_cam": coarse_cam}

        if self.fusion == "aaf":
            # Map index l = h * K + k (head-major), as WeakTr flattens (B, H, K) maps.
            features = jnp.stack(pooled, axis=1)  # (B, K, d, H)
            features = jnp.transpose(features, (0, 3, 1, 2)).reshape(batch, heads * depth, -1)
            weights = self.aaf(features).reshape(batch, heads, depth)
            fused = _fused_attention(vit, inputs, weights) / (heads * depth)
            cross, patch = fused, fused
        else:
            uniform = jnp.full((batch, heads), 1.0 / heads, x.dtype)
            per_layer = [_fused_layer_attention(vit, k, inputs[k], uniform) for k in range(depth)]
            cross = sum(per_layer[depth - self.mctformer_layers:])
            patch = sum(per_layer)
        cross_attention = cross[:, :num_classes, num_classes:].reshape(batch, num_classes, *grid)
        fused_cam = cross_attention * nn.relu(jax.lax.stop_gradient(coarse_cam))
        patch_attention = patch[:, num_classes:, num_classes:]
        outputs.update(cross_attention=cross_attention, fused_cam=fused_cam, patch_attention=patch_attention)
        if self.fusion == "aaf":
            fine = jnp.einsum("bij,bcj->bci", patch_attention, fused_cam.reshape(batch, num_classes, -1))
            outputs["fine_logits"] = fine.mean(-1)
        return outputs
