"""Official Segmenter checkpoints (rstrudel/segmenter `segm/model/{vit,decoder,segmenter}.py`) and WeakTr
stage-2 checkpoints (hustvl/WeakTr `OnlineRetraining/segm`, the same code) -> jaxseg `Segmenter` keyword
arguments and params.

The encoder is a DeiT-style ViT under `encoder.`; it goes through `from_timm` with Segmenter's numerics:
torch's default LayerNorm eps (1e-5, not timm's 1e-6) and a bilinear position-embedding resize. The names
map as:
  official                                              jaxseg
  encoder.<timm ViT names> (blocks, norm, pos_embed...)  encoder/... (see jaxseg.convert.timm)
  encoder.cls_token, encoder.dist_token (distilled DeiT) encoder/cls_token (1, 2, D): 2 class tokens, both
                                                         dropped before the decoder as the official code does
  encoder.head.*, encoder.head_dist.*                    dropped (ImageNet classifiers, never used)
  decoder.head.{weight,bias} (DecoderLinear)             head/{kernel,bias}
  decoder.proj_dec.{weight,bias} (MaskTransformer)       proj_dec/{kernel,bias}
  decoder.cls_emb (1, N, D)                              cls_emb
  decoder.proj_patch, decoder.proj_classes (D, D)        proj_patch, proj_classes (x @ W in both)
  decoder.decoder_norm.*, decoder.mask_norm.*            decoder_norm/*, mask_norm/*
  decoder.blocks.i.* (timm-style blocks)                 blocks_i/* (`block_from_timm`)
WeakTr's `MultiMaskTransformer` has the `MaskTransformer`'s names; jaxseg's Segmenter reads the decoder out
after every block either way. EVA-02 encoders (rotary embeddings, WeakTr's `eva02_*` backbones) have no
jaxseg counterpart.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.convert.timm import (
    abstract_params,
    block_from_timm,
    from_timm,
    infer_config,
    layer_norm_from_torch,
    linear_from_torch,
    to_timm,
)
from jaxseg.models.segmenter import Segmenter

_ENCODER, _DECODER = "encoder.", "decoder."
_CLASSIFIERS = re.compile(r"^encoder\.head(_dist)?\.")


def _shapes(tree) -> dict[str, tuple]:
    return flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.shape, tree), sep="/")


def _decoder_shapes(kind: str, width: int, num_classes: int, depth: int, mlp_dim: int) -> dict[str, tuple]:
    """The official decoder's parameter names (without `decoder.`) and shapes."""
    if kind == "linear":
        return {"head.weight": (num_classes, width), "head.bias": (num_classes,)}
    shapes = {"cls_emb": (1, num_classes, width), "proj_dec.weight": (width, width), "proj_dec.bias": (width,),
              "proj_patch": (width, width), "proj_classes": (width, width),
              "decoder_norm.weight": (width,), "decoder_norm.bias": (width,),
              "mask_norm.weight": (num_classes,), "mask_norm.bias": (num_classes,)}
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (mlp_dim, width),
             "mlp.fc1.bias": (mlp_dim,), "mlp.fc2.weight": (width, mlp_dim), "mlp.fc2.bias": (width,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def _encoder_shapes(config: Mapping[str, Any], distilled: bool) -> dict[str, tuple]:
    """The official encoder's parameter names (without `encoder.`, classifiers left out) and shapes."""
    shapes = {k: tuple(v.shape) for k, v in jax.eval_shape(lambda p: to_timm(p, config),
                                                           abstract_params(config)).items()}
    if distilled:  # the two official tokens are one (1, 2, D) parameter of the jaxseg ViT
        shapes["cls_token"] = shapes["dist_token"] = (1, 1, config["width"])
    return shapes


def from_official_segmenter(state_dict: Mapping[str, Any], *, num_heads: int | None = None,
                            decoder_heads: int | None = None, source_grid: Sequence[int] | None = None,
                            **encoder_overrides) -> tuple[dict, dict]:
    """(Segmenter keyword arguments, params) from an official Segmenter or WeakTr stage-2 state dict.

    Args:
      state_dict: {name: torch tensor or numpy array} with `encoder.` and `decoder.` names, bare or
        wrapped as the official `train.py` saves it ({"model": state_dict, "optimizer": ..., ...}), e.g.
        from `load_state_dict("checkpoint.pth")`.
      num_heads: the encoder's heads; not stored in the weights, inferred for the standard widths (Ti 3,
        S 6, B 12, L 16, as the official `config.yml`).
      decoder_heads: the mask transformer's heads; not stored either, by default width / 64 as the
        official `create_decoder` sets them.
      source_grid: (rows, cols) of a non-square position-embedding grid (the checkpoint's image size
        over the patch size).
      **encoder_overrides: `from_timm` target options, e.g. `drop_path_rate=0.1` for training or
        `image_size=` to resample the position embedding.

    Raises:
      WeightConversionError: naming every missing, unexpected or misshaped entry under its official name.
    """
    sd = unwrap(state_dict)
    if not any(k.startswith(_ENCODER) for k in sd) or not any(k.startswith(_DECODER) for k in sd):
        raise WeightConversionError(f"not a Segmenter state dict: it needs '{_ENCODER}' and '{_DECODER}' entries "
                                    f"(first keys: {', '.join(sorted(sd)[:6])})")
    if any(k.startswith(_ENCODER + "rope.") or k.endswith(".attn.q_bias") for k in sd):
        raise WeightConversionError("the encoder is an EVA-02 (rotary position embeddings, q/v biases), which "
                                    "jaxseg's ViT does not implement: convert a DeiT, ViT or DINOv2 one")
    encoder = {k[len(_ENCODER):]: v for k, v in sd.items() if k.startswith(_ENCODER) and not _CLASSIFIERS.match(k)}
    decoder = {k[len(_DECODER):]: v for k, v in sd.items() if k.startswith(_DECODER)}
    distilled = "dist_token" in encoder
    if distilled and "cls_token" in encoder:
        encoder["cls_token"] = np.concatenate([encoder["cls_token"], encoder.pop("dist_token")], axis=1)
    try:
        # The official encoder always ends with its norm, so a checkpoint without one is missing it.
        source = dict(infer_config(encoder, num_heads, source_grid, posemb_covers_prefix=True), final_norm=True)
    except WeightConversionError as e:
        raise WeightConversionError(f"encoder ('{_ENCODER}' entries): {e}") from e
    width = source["width"]
    if width % source["num_heads"]:
        raise WeightConversionError(f"width {width} is not divisible by num_heads {source['num_heads']}")

    mask_transformer_roots = {k.split(".")[0] for k in _decoder_shapes("mask_transformer", 1, 1, 1, 1)}
    kind = "mask_transformer" if any(k.split(".")[0] in mask_transformer_roots for k in decoder) else "linear"
    class_axes = {"head.weight": 0, "head.bias": 0} if kind == "linear" else {"cls_emb": 1, "mask_norm.bias": 0}
    num_classes = next((decoder[k].shape[axis] for k, axis in class_axes.items() if k in decoder), None)
    if num_classes is None:
        raise WeightConversionError(f"the {kind} decoder has none of {[_DECODER + k for k in class_axes]}, "
                                    f"which give the number of classes")
    depth = 1 + max((int(m.group(1)) for k in decoder if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if kind == "mask_transformer" and depth == 0:
        raise WeightConversionError(f"the mask-transformer decoder has no '{_DECODER}blocks.<i>.' entries")
    fc1 = decoder.get("blocks.0.mlp.fc1.weight")
    mlp_dim = 4 * width if fc1 is None else fc1.shape[0]
    expected = {_ENCODER + k: v for k, v in _encoder_shapes(source, distilled).items()}
    expected.update({_DECODER + k: v for k, v in _decoder_shapes(kind, width, num_classes, depth, mlp_dim).items()})
    actual = {k: v.shape for k, v in sd.items() if not _CLASSIFIERS.match(k)}
    diff = shape_diff(expected, actual)
    if diff:
        raise WeightConversionError(f"state dict does not match an official Segmenter ({kind} decoder"
                                    + (f" of depth {depth}" if depth else "")
                                    + f", {num_classes} classes, encoder width {width}):\n" + "\n".join(diff))

    encoder_config, encoder_params = from_timm(
        encoder, ignore=(), source_grid=source_grid, source_posemb_covers_prefix=True, num_heads=source["num_heads"],
        **{"layernorm_eps": 1e-5, "posemb_resize": "bilinear", **encoder_overrides})
    config = {"encoder": encoder_config, "num_classes": int(num_classes), "decoder": kind}
    if kind == "linear":
        params = {"head": linear_from_torch(decoder, "head")}
    else:
        if decoder_heads is None:
            if width % 64:
                raise WeightConversionError(f"cannot infer the decoder's heads for width {width} (the official "
                                            f"rule is width / 64); pass decoder_heads=")
            decoder_heads = width // 64
        if width % decoder_heads:
            raise WeightConversionError(f"width {width} is not divisible by decoder_heads {decoder_heads}")
        config.update(decoder_depth=depth, decoder_heads=decoder_heads, decoder_mlp_dim=int(mlp_dim))
        params = {"proj_dec": linear_from_torch(decoder, "proj_dec"), "cls_emb": decoder["cls_emb"],
                  "proj_patch": decoder["proj_patch"], "proj_classes": decoder["proj_classes"],
                  "decoder_norm": layer_norm_from_torch(decoder, "decoder_norm"),
                  "mask_norm": layer_norm_from_torch(decoder, "mask_norm")}
        params.update({f"blocks_{i}": block_from_timm(decoder, f"blocks.{i}.", decoder_heads) for i in range(depth)})
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), dict(params, encoder=encoder_params))

    grid, patch = config["encoder"]["posemb_grid"], config["encoder"]["patch_size"]
    images = jax.ShapeDtypeStruct((1, grid[0] * patch, grid[1] * patch, encoder_config["in_channels"]), jnp.float32)
    abstract = jax.eval_shape(lambda x: Segmenter(**config).init(jax.random.key(0), x), images)["params"]
    check = shape_diff(_shapes(flax.linen.unbox(abstract)), _shapes(params))
    if check:  # a bug in this module rather than in the user's input
        raise AssertionError("converted params do not match the Segmenter:\n" + "\n".join(check))
    return config, params
