"""EoMT checkpoints -> jaxseg `EoMT` params: Hugging Face `EomtForUniversalSegmentation` /
`EomtDinov3ForUniversalSegmentation` and the official tue-mps/eomt layout, over DINOv2 or DINOv3.

A DINOv2 encoder is re-expressed as a timm state dict and goes through `from_timm`; a DINOv3 encoder is
re-expressed under transformers' `DINOv3ViTModel` names and goes through `from_dinov3` (same diffs, same
layouts). The official DINOv3 EoMT weights are published as differences from the DINOv3 backbone
(tue-mps/eomt `delta_weights`: the encoder holds fine-tuned minus pretrained weights, everything else the
weights themselves, since it starts from zero): `from_official_eomt(..., base=<DINOv3 state dict>)` adds
them back. The heads map as:
  official                        Hugging Face                          jaxseg
  q.weight (Q, D)                 query.weight                          queries
  class_head.{weight,bias}        class_predictor.*                     class_head/{kernel,bias}
  mask_head.{0,2,4}.*             mask_head.fc{1,2,3}.*                 mask_head_{0,1,2}/{kernel,bias}
  upscale.i.conv1.* (in,out,2,2)  upscale_block.block.i.conv1.*         upscale_i/conv1/{kernel (2,2,in,out),bias}
  upscale.i.conv2.weight (D,1,3,3) upscale_block.block.i.conv2.weight   upscale_i/conv2/kernel (3,3,1,D)
  upscale.i.norm.*                upscale_block.block.i.layernorm2d.*   upscale_i/norm/{scale,bias}
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.convert.dinov3 import from_dinov3
from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.convert.timm import from_timm
from jaxseg.errors import UserError

# Buffers that are state, not weights: annealing probabilities, pixel statistics, HF's loss class weights.
_BUFFERS = (r"(^|\.)attn_mask_probs$", r"(^|\.)pixel_(mean|std)$", r"^criterion\.")


def _heads(take, names: Mapping[str, Any], num_upscale: int) -> dict:
    """jaxseg head params from a `take(name)` that pops source tensors; `names` gives the source names:
    "queries", "class_head", "mask_head" (the three linears), "upscale" ({i} = block) and "upscale_norm"."""
    def linear(prefix):
        return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

    params = {"queries": take(names["queries"]), "class_head": linear(names["class_head"])}
    for i, source in enumerate(names["mask_head"]):
        params[f"mask_head_{i}"] = linear(source)
    for i in range(num_upscale):
        prefix = names["upscale"].format(i=i)
        params[f"upscale_{i}"] = {
            "conv1": {"kernel": take(f"{prefix}.conv1.weight").transpose(2, 3, 0, 1),
                      "bias": take(f"{prefix}.conv1.bias")},
            "conv2": {"kernel": take(f"{prefix}.conv2.weight").transpose(2, 3, 1, 0)},
            "norm": {"scale": take(f"{prefix}.{names['upscale_norm']}.weight"),
                     "bias": take(f"{prefix}.{names['upscale_norm']}.bias")}}
    return params


def _convert(sd: dict, encoder: tuple[dict, dict], names: Mapping[str, str], num_classes: int | None,
             num_upscale: int, eomt_overrides: Mapping[str, Any]):
    from jaxseg.models.eomt import EoMT

    encoder_config, encoder_params = encoder
    missing = []

    def take(name):
        if name not in sd:
            missing.append(name)
            return np.zeros((0,), np.float32)
        return np.asarray(sd.pop(name), np.float32)

    heads = _heads(take, names, num_upscale)
    leftover = sorted(k for k in sd if not any(re.search(p, k) for p in _BUFFERS))
    if missing or leftover:
        lines = [f"  - missing     {k}" for k in missing] + [f"  + unexpected  {k}" for k in leftover]
        raise WeightConversionError("EoMT state dict does not match the expected layout:\n" + "\n".join(lines))
    config = dict(encoder=encoder_config, num_classes=heads["class_head"]["bias"].shape[0] - 1,
                  num_queries=heads["queries"].shape[0], num_upscale_blocks=num_upscale)
    config.update(eomt_overrides)
    if num_classes is not None and num_classes != config["num_classes"]:
        raise WeightConversionError(f"the class head has {config['num_classes']} classes (+ no object), "
                                    f"not {num_classes}")
    params = dict(heads, encoder=encoder_params)
    size = (4 * encoder_config["patch_size"],) * 2
    abstract = jax.eval_shape(lambda: EoMT(**config).init(
        jax.random.key(0), jnp.zeros((1, *size, 3))))["params"]
    diff = shape_diff(
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x.shape, flax.linen.unbox(abstract)),
                                        sep="/"),
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.shape, params), sep="/"))
    if diff:
        raise WeightConversionError("EoMT heads do not match the model:\n" + "\n".join(diff))
    return config, params


def _hf_getter(hf_config: Any):
    return hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)


def _hf_dinov2_encoder(sd: dict, get, timm_overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Pops transformers' EoMT (DINOv2) encoder entries from `sd` and converts them via timm names."""
    encoder = {}
    renames = [(r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.register_tokens$", "reg_token"),
               (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
               (r"^layernorm\.", "norm."), (r"^layers\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attn.proj."),
               (r"^layers\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
               (r"^layers\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
               (r"^layers\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2.")]
    for key in list(sd):
        for pattern, replacement in renames:
            if re.search(pattern, key):
                encoder[re.sub(pattern, replacement, key)] = sd.pop(key)
                break
    if "embeddings.position_embeddings.weight" in sd:
        encoder["pos_embed"] = sd.pop("embeddings.position_embeddings.weight")[None]
    for i in range(get("num_hidden_layers")):
        prefix = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{prefix}attention.{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                encoder[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
            gate_up = [sd.pop(f"{prefix}mlp.{p}_proj.{kind}", None) for p in ("gate", "up")]
            if all(p is not None for p in gate_up):
                encoder[f"blocks.{i}.mlp.fc1.{kind}"] = np.concatenate(gate_up, axis=0)
    grid = get("image_size") // get("patch_size")
    overrides = dict(num_heads=get("num_attention_heads"), layernorm_eps=get("layer_norm_eps", 1e-6),
                     **timm_overrides)
    return from_timm(encoder, source_grid=(grid, grid), source_posemb_covers_prefix=False, **overrides)


def _pop_dinov3_encoder(sd: dict, renames: Mapping[str, str]) -> dict:
    """Pops the encoder entries of an EoMT state dict over DINOv3, renamed onto `DINOv3ViTModel` names
    (`renames`: source prefix -> transformers prefix)."""
    encoder = {}
    for key in list(sd):
        for old, new in renames.items():
            if key.startswith(old):
                encoder[new + key[len(old):]] = sd.pop(key)
                break
    return encoder


def from_hf_eomt(state_dict: Mapping[str, Any], hf_config: Any, **encoder_overrides) -> tuple[dict, dict]:
    """(EoMT config, params) from a transformers `EomtForUniversalSegmentation` or
    `EomtDinov3ForUniversalSegmentation` state dict and its config (the config object or a dict with its
    fields). `encoder_overrides` go to `from_timm` (DINOv2, e.g. `image_size`) or `from_dinov3`."""
    get = _hf_getter(hf_config)
    sd = unwrap(state_dict)
    if get("model_type") == "eomt_dinov3":
        if get("hidden_act", "gelu") != "gelu":
            raise WeightConversionError(
                f"transformers' EoMT-DINOv3 applies hidden_act={get('hidden_act')!r} in its mask head and "
                f"upscale blocks too; EoMT's heads use GELU (as tue-mps/eomt), so only gelu converts")
        encoder_sd = _pop_dinov3_encoder(sd, {"embeddings.": "embeddings.", "layers.": "layer.",
                                              "layernorm.": "norm."})
        encoder = from_dinov3(encoder_sd, hf_config, **encoder_overrides)
    else:
        encoder = _hf_dinov2_encoder(sd, get, encoder_overrides)
    names = {"queries": "query.weight", "class_head": "class_predictor",
             "mask_head": ["mask_head.fc1", "mask_head.fc2", "mask_head.fc3"],
             "upscale": "upscale_block.block.{i}", "upscale_norm": "layernorm2d"}
    eomt = dict(num_query_blocks=get("num_blocks"), normalize_input=False)
    return _convert(sd, encoder, names, get("num_labels"), get("num_upscale_blocks"), eomt)


def _add_base(delta: tuple[dict, dict], base: tuple[dict, dict]) -> tuple[dict, dict]:
    """The encoder of a delta checkpoint plus its DINOv3 base, leaf by leaf, after checking that both
    are the same ViT."""
    (config, params), (base_config, base_params) = delta, base
    different = {k: (base_config[k], config[k]) for k in ("width", "depth", "mlp_dim", "mlp_type", "patch_size",
                                                         "num_registers", "qkv_bias")
                 if base_config[k] != config[k]}
    if different:
        raise WeightConversionError(
            "the DINOv3 base does not match the checkpoint's encoder: " + ", ".join(
                f"{k} {b} (base) vs {d} (checkpoint)" for k, (b, d) in different.items())
            + "; use the DINOv3 backbone the checkpoint was fine-tuned from (its EoMT config names it)")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat_base = flax.traverse_util.flatten_dict(base_params, sep="/")
    diff = shape_diff({k: np.shape(v) for k, v in flat.items()}, {k: np.shape(v) for k, v in flat_base.items()})
    if diff:
        raise WeightConversionError("the DINOv3 base does not match the checkpoint's encoder:\n" + "\n".join(diff))
    summed = {k: np.asarray(v, np.float32) + np.asarray(flat_base[k], np.float32) for k, v in flat.items()}
    return config, flax.traverse_util.unflatten_dict(summed, sep="/")


def from_official_eomt(state_dict: Mapping[str, Any], *, num_query_blocks: int,
                       num_classes: int | None = None, base: Mapping[str, Any] | None = None,
                       absolute: bool = False, **encoder_overrides) -> tuple[dict, dict]:
    """(EoMT config, params) from a tue-mps/eomt checkpoint: the network's state dict (`q.weight`,
    `class_head`, `mask_head.{0,2,4}`, `upscale.i.*`, `encoder.backbone.<ViT>`), with or without a
    leading prefix such as Lightning's `network.`. The number of query blocks (L2) is not stored in the
    weights: pass it (3 for ViT-S/B, 4 for L, 5 for g).

    The backbone is a timm DINOv2 ViT, or transformers' DINOv3 ViT (`patch_embed.patch_embeddings`,
    `blocks.i.attention.*`). The published DINOv3 checkpoints hold differences from the DINOv3 weights:
    pass the DINOv3 backbone state dict (any layout `from_dinov3` reads) as `base`, or `absolute=True` for a
    checkpoint saved with `--model.delta_weights False`. `encoder_overrides` go to `from_timm` (DINOv2) or
    `from_dinov3` (DINOv3: both the checkpoint and the base).
    """
    sd = unwrap(state_dict)
    prefixes = {m.group(1) or "" for k in sd if (m := re.fullmatch(r"(.*\.)?q\.weight", k))
                and "encoder." not in k}
    if len(prefixes) != 1:
        raise WeightConversionError(f"cannot find the EoMT query embedding 'q.weight' (found prefixes "
                                    f"{sorted(prefixes)})")
    prefix = prefixes.pop()
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    backbone = "encoder.backbone."
    if backbone + "patch_embed.patch_embeddings.weight" in sd:
        # tue-mps/eomt renames the transformers DINOv3 model's modules to timm's (`embeddings` ->
        # `patch_embed`, `layer` -> `blocks`); its rotary tables are buffers, not weights.
        encoder_sd = _pop_dinov3_encoder(sd, {backbone + "patch_embed.": "embeddings.",
                                              backbone + "blocks.": "layer.", backbone + "norm.": "norm."})
        if base is None and not absolute:
            raise WeightConversionError(
                "this is a DINOv3 EoMT checkpoint, and the official ones hold differences from the DINOv3 "
                "weights (tue-mps/eomt delta_weights): pass the DINOv3 backbone file as the base "
                "(--base), or declare the checkpoint absolute (--absolute) if it was saved with "
                "--model.delta_weights False")
        if base is not None and absolute:
            raise UserError("a base is only added to delta checkpoints: drop it, or drop absolute=True")
        encoder = from_dinov3(encoder_sd, **encoder_overrides)
        if base is not None:
            encoder = _add_base(encoder, from_dinov3(base, **encoder_overrides))
    else:
        if base is not None:
            raise UserError("a base is only for DINOv3 delta checkpoints; this checkpoint's backbone is a "
                            "timm ViT (DINOv2) with absolute weights")
        encoder = from_timm({k[len(backbone):]: sd.pop(k) for k in list(sd) if k.startswith(backbone)},
                            **encoder_overrides)
    num_upscale = len({m.group(1) for k in sd if (m := re.match(r"upscale\.(\d+)\.", k))})
    # mask_head is nn.Sequential(Linear, GELU, Linear, GELU, Linear): the linears sit at 0, 2, 4.
    names = {"queries": "q.weight", "class_head": "class_head",
             "mask_head": ["mask_head.0", "mask_head.2", "mask_head.4"],
             "upscale": "upscale.{i}", "upscale_norm": "norm"}
    eomt = dict(num_query_blocks=num_query_blocks, normalize_input=True)
    return _convert(sd, encoder, names, num_classes, num_upscale, eomt)
