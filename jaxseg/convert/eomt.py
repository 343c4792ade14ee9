"""EoMT checkpoints -> jaxseg `EoMT` params: Hugging Face `EomtForUniversalSegmentation` and the official
tue-mps/eomt layout.

The encoder is re-expressed as a timm state dict and goes through `from_timm` (same diff, same layouts);
the heads map as:
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

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.convert.timm import from_timm

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


def _convert(sd: dict, encoder_sd: dict, names: Mapping[str, str], num_classes: int | None,
             num_upscale: int, eomt_overrides: Mapping[str, Any], timm_overrides: Mapping[str, Any]):
    from jaxseg.models.eomt import EoMT

    encoder_config, encoder_params = from_timm(encoder_sd, **timm_overrides)
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
    grid = encoder_config["posemb_grid"]
    size = (grid[0] * encoder_config["patch_size"], grid[1] * encoder_config["patch_size"])
    abstract = jax.eval_shape(lambda: EoMT(**config).init(
        jax.random.key(0), jnp.zeros((1, *size, 3))))["params"]
    diff = shape_diff(
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x.shape, flax.linen.unbox(abstract)),
                                        sep="/"),
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.shape, params), sep="/"))
    if diff:
        raise WeightConversionError("EoMT heads do not match the model:\n" + "\n".join(diff))
    return config, params


def from_hf_eomt(state_dict: Mapping[str, Any], hf_config: Any, **timm_overrides) -> tuple[dict, dict]:
    """(EoMT config, params) from a transformers `EomtForUniversalSegmentation` state dict and its config
    (an `EomtConfig` or a dict with its fields). `timm_overrides` go to `from_timm` (e.g. `image_size`)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    sd = unwrap(state_dict)
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
    depth = get("num_hidden_layers")
    for i in range(depth):
        prefix = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{prefix}attention.{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                encoder[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
            gate_up = [sd.pop(f"{prefix}mlp.{p}_proj.{kind}", None) for p in ("gate", "up")]
            if all(p is not None for p in gate_up):
                encoder[f"blocks.{i}.mlp.fc1.{kind}"] = np.concatenate(gate_up, axis=0)
    grid = get("image_size") // get("patch_size")
    timm_overrides = dict(num_heads=get("num_attention_heads"), layernorm_eps=get("layer_norm_eps", 1e-6),
                          **timm_overrides)
    names = {"queries": "query.weight", "class_head": "class_predictor",
             "mask_head": ["mask_head.fc1", "mask_head.fc2", "mask_head.fc3"],
             "upscale": "upscale_block.block.{i}", "upscale_norm": "layernorm2d"}
    eomt = dict(num_query_blocks=get("num_blocks"), normalize_input=False)
    return _convert(sd, encoder, names, get("num_labels"), get("num_upscale_blocks"), eomt,
                    dict(timm_overrides, source_grid=(grid, grid), source_posemb_covers_prefix=False))


def from_official_eomt(state_dict: Mapping[str, Any], *, num_query_blocks: int,
                       num_classes: int | None = None, **timm_overrides) -> tuple[dict, dict]:
    """(EoMT config, params) from a tue-mps/eomt checkpoint: the network's state dict (`q.weight`,
    `class_head`, `mask_head.{0,2,4}`, `upscale.i.*`, `encoder.backbone.<timm ViT>`), with or without a
    leading prefix such as Lightning's `network.`. The number of query blocks (L2) is not stored in the
    weights: pass it (3 for ViT-S/B, 4 for L, 5 for g)."""
    sd = unwrap(state_dict)
    prefixes = {m.group(1) or "" for k in sd if (m := re.fullmatch(r"(.*\.)?q\.weight", k))
                and "encoder." not in k}
    if len(prefixes) != 1:
        raise WeightConversionError(f"cannot find the EoMT query embedding 'q.weight' (found prefixes "
                                    f"{sorted(prefixes)})")
    prefix = prefixes.pop()
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    backbone = "encoder.backbone."
    encoder = {k[len(backbone):]: sd.pop(k) for k in list(sd) if k.startswith(backbone)}
    num_upscale = len({m.group(1) for k in sd if (m := re.match(r"upscale\.(\d+)\.", k))})
    # mask_head is nn.Sequential(Linear, GELU, Linear, GELU, Linear): the linears sit at 0, 2, 4.
    names = {"queries": "q.weight", "class_head": "class_head",
             "mask_head": ["mask_head.0", "mask_head.2", "mask_head.4"],
             "upscale": "upscale.{i}", "upscale_norm": "norm"}
    eomt = dict(num_query_blocks=num_query_blocks, normalize_input=True)
    return _convert(sd, encoder, names, num_classes, num_upscale, eomt, timm_overrides)
