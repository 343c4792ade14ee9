"""Official WeakTr stage-1 checkpoints (hustvl/WeakTr `models.py` + `AAF.py`, V3; also MCTformer-V2's) ->
jaxseg `WeakTr` keyword arguments and params.

Stage-2 encoders (Segmenter's DeiT-S, ViT-S, ...) are plain timm ViTs: convert those with `from_timm`, as
stage 1's ImageNet initialisation too: `from_timm(deit_s, num_cls_tokens=C, final_norm=False)` repeats
DeiT's class token and its position entry C times, as WeakTr's `main.py` does.

The official network subclasses DeiT's VisionTransformer, so the encoder is a timm state dict with C class
tokens and goes through `from_timm`; the rest maps as:
  official                                                   jaxseg
  cls_token (1, C, D), pos_embed (1, C + P, D)               encoder/cls_token, encoder/pos_embed
  norm.{weight,bias}                                         dropped (stage 1 never applies it)
  head.weight (C, D, 3, 3), head.bias                        head/kernel (3, 3, D, C), head/bias
  adaptive_attention_fusion.attn_feat_ffn.{0,1}.{weight,bias} aaf/feat_fc{1,2}/{kernel,bias}
  adaptive_attention_fusion.attn_head_ffn.{0,2}.weight       aaf/head_fc{1,2}/kernel
A checkpoint without AAF entries is an MCTformer-V2 network (fusion "mctformer").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.convert.timm import from_timm
from jaxseg.errors import UserError
from jaxseg.models.weaktr import FUSIONS, WeakTr

_AAF = "adaptive_attention_fusion."
# jaxseg name -> (official name, has a bias). attn_head_ffn is Linear, ReLU, Linear, Sigmoid.
_AAF_LINEARS = {"feat_fc1": ("attn_feat_ffn.0", True), "feat_fc2": ("attn_feat_ffn.1", True),
                "head_fc1": ("attn_head_ffn.0", False), "head_fc2": ("attn_head_ffn.2", False)}
_HEAD = ("head.weight", "head.bias")


def _aaf_names() -> list[str]:
    return [f"{_AAF}{source}.{kind}" for source, bias in _AAF_LINEARS.values()
            for kind in (("weight", "bias") if bias else ("weight",))]


def _shapes(tree) -> dict[str, tuple]:
    return flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.shape, tree), sep="/")


def from_official_weaktr(state_dict: Mapping[str, Any], *, num_heads: int | None = None,
                         fusion: str | None = None, pool: str = "max", mctformer_layers: int | None = None,
                         source_grid: Sequence[int] | None = None, **encoder_overrides) -> tuple[dict, dict]:
    """(WeakTr keyword arguments, params) from an official WeakTr or MCTformer-V2 stage-1 state dict.

    Args:
      state_dict: {name: torch tensor or numpy array}, bare or wrapped as the official `main.py` saves it
        ({"model": state_dict, "epoch": ...}), e.g. from `load_state_dict("checkpoint_best_mIoU.pth")`.
      num_heads: not stored in the weights; inferred from the AAF shapes (d = D / heads) or, without
        them, from a standard width.
      fusion: "aaf" or "mctformer"; by default "aaf" exactly when the checkpoint has AAF entries.
      pool: the AAF token pooling (`--pool-type`): "max" in every V2/V3 script; not stored either.
      mctformer_layers: MCTformer's number of last layers summed into the cross attention (default:
        all of them, as MCTformer-V2).
      source_grid: (rows, cols) of a non-square position-embedding grid.
      **encoder_overrides: `from_timm` target options, e.g. `drop_path_rate=0.1` for training or
        `image_size=` to resample the position embedding.

    Raises:
      WeightConversionError: naming every missing, unexpected or misshaped entry, or a class count that
        the position embedding contradicts.
    """
    sd = unwrap(state_dict)
    if "cls_token" not in sd or "pos_embed" not in sd:
        raise WeightConversionError("not a WeakTr state dict: it needs 'cls_token' (1, C, D) and 'pos_embed' "
                                    "(1, C + P, D)")
    fusion = fusion or ("aaf" if any(k.startswith(_AAF) for k in sd) else "mctformer")
    if fusion not in FUSIONS:
        raise UserError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    num_classes = sd["cls_token"].shape[1]
    num_patches = sd["pos_embed"].shape[1] - num_classes
    if source_grid is None and (num_patches <= 0 or math.isqrt(num_patches) ** 2 != num_patches):
        raise WeightConversionError(
            f"pos_embed has {sd['pos_embed'].shape[1]} entries and cls_token {num_classes} class tokens, "
            f"which leaves {num_patches} patch positions, not a square grid: the checkpoint's class count "
            f"and position embedding disagree (or pass source_grid=(rows, cols))")

    expected = list(_HEAD) + (_aaf_names() if fusion == "aaf" else [])
    lines = [f"  - missing     {k}" for k in expected if k not in sd]
    lines += [f"  + unexpected  {k} {sd[k].shape}" for k in sorted(sd)
              if k.startswith(_AAF) and k not in expected]
    tensors = {k: sd.pop(k) for k in expected if k in sd}
    for k in [k for k in sd if k.startswith(_AAF)]:
        del sd[k]
    feat_fc1 = tensors.get(f"{_AAF}attn_feat_ffn.0.weight")
    if feat_fc1 is not None and "patch_embed.proj.weight" in sd:
        # The AAF reads D / heads channels per map, so an AAF checkpoint does store its head count.
        inferred = sd["patch_embed.proj.weight"].shape[0] // feat_fc1.shape[1]
        if num_heads not in (None, inferred):
            raise WeightConversionError(f"num_heads={num_heads}, but the AAF features have "
                                        f"{feat_fc1.shape[1]} channels, i.e. {inferred} heads")
        num_heads = inferred
    try:
        encoder, encoder_params = from_timm(
            sd, ignore=(), source_grid=source_grid, source_posemb_covers_prefix=True, num_heads=num_heads,
            final_norm=False, **{"posemb_resize": "dino", **encoder_overrides})
    except WeightConversionError as e:
        lines.append(f"  encoder: {e}")
    if lines:
        raise WeightConversionError("state dict does not match the official WeakTr layout "
                                    f"(fusion {fusion!r}):\n" + "\n".join(lines))

    params = {"encoder": encoder_params,
              "head": {"kernel": tensors["head.weight"].transpose(2, 3, 1, 0), "bias": tensors["head.bias"]}}
    config = dict(encoder=encoder, num_classes=num_classes, fusion=fusion, pool=pool)
    if fusion == "aaf":
        params["aaf"] = {}
        for name, (source, bias) in _AAF_LINEARS.items():
            params["aaf"][name] = {"kernel": tensors[f"{_AAF}{source}.weight"].T}
            if bias:
                params["aaf"][name]["bias"] = tensors[f"{_AAF}{source}.bias"]
        # The official layers are int(n / r) wide; n // width is an integer r that gives that width back.
        (head_dim, feat_hidden), (maps, squeeze) = (params["aaf"][n]["kernel"].shape
                                                    for n in ("feat_fc1", "head_fc1"))
        config.update(feat_reduction=head_dim // feat_hidden, reduction=maps // squeeze)
        if maps != encoder["depth"] * encoder["num_heads"]:
            raise WeightConversionError(f"the AAF weighs {maps} attention maps, but the encoder has "
                                        f"{encoder['depth']} layers x {encoder['num_heads']} heads")
    else:
        config["mctformer_layers"] = mctformer_layers or encoder["depth"]
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)

    grid, patch = encoder["posemb_grid"], encoder["patch_size"]
    images = jax.ShapeDtypeStruct((1, grid[0] * patch, grid[1] * patch, encoder["in_channels"]), jnp.float32)
    abstract = jax.eval_shape(lambda x: WeakTr(**config).init(jax.random.key(0), x), images)["params"]
    diff = shape_diff(_shapes(flax.linen.unbox(abstract)), _shapes(params))
    if diff:
        raise WeightConversionError("the CAM head or the AAF does not fit the encoder (the head has one "
                                    "output per class token):\n" + "\n".join(diff))
    return config, params
