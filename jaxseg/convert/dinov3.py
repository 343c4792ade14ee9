"""DINOv3 ViT state dicts -> jaxseg ViT params, from the three layouts in use:

  transformers `DINOv3ViTModel`*     official facebookresearch/dinov3     timm `Eva` (vit_*_dinov3)
  embeddings.cls_token               cls_token                            cls_token
  embeddings.register_tokens         storage_tokens                       reg_token
  embeddings.patch_embeddings.*      patch_embed.proj.*                   patch_embed.proj.*
  layer.i.attention.{q,k,v}_proj.*   blocks.i.attn.qkv.* (+ bias_mask)    blocks.i.attn.qkv.weight, q_bias, v_bias
  layer.i.attention.o_proj.*         blocks.i.attn.proj.*                 blocks.i.attn.proj.*
  layer.i.layer_scale{1,2}.lambda1   blocks.i.ls{1,2}.gamma               blocks.i.gamma_{1,2}
  layer.i.mlp.{up,down}_proj.*       blocks.i.mlp.{fc1,fc2}.*             blocks.i.mlp.{fc1,fc2}.*
  layer.i.mlp.gate_proj.* (SwiGLU)   blocks.i.mlp.{w1,w2,w3}.*            blocks.i.mlp.{fc1_g,fc1_x,fc2}.*
  layer.i.norm{1,2}.*, norm.*        same                                 same

* transformers 5 spells the blocks `model.layer.i`; both spellings are read.
Every layout is first renamed onto the transformers names, which then map onto jaxseg's
(`blocks_i/attn/{query,key,value,out}`, `ls{1,2}/gamma`, `mlp/{fc1,fc2}` or `mlp/{fc1_gate,fc1_up,fc2}`).
DINOv3 fixes its key bias at 0 (the official `bias_mask`, transformers' `key_bias=False`): a stored key
bias is dropped. Training-only entries (mask token, the 7B's local-crop class norm, the RoPE period
buffer, which is checked against the base period instead) are not weights of the model.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.errors import UserError
from jaxseg.models.vit import FAMILIES, ViT

log = logging.getLogger(__name__)

# Heads of DINOv3's published widths (64 channels per head); other widths need `num_heads=`.
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
_NOT_WEIGHTS = (r"(^|\.)mask_token$", r"\.bias_mask$", r"^local_cls_norm\.", r"^rope_embed\.periods$")
# Options a converted model may take; everything else is fixed by the tensors.
_OPTIONS = ("num_heads", "layernorm_eps", "rope_base", "rope_normalize", "rope_shift", "rope_jitter",
            "rope_rescale", "final_norm", "drop_path_rate", "dropout_rate", "attention_dropout_rate",
            "dtype", "param_dtype", "remat", "posemb_grid")


def detect_layout(sd: Mapping[str, Any]) -> str:
    """"hf", "official" or "timm" for a DINOv3 state dict; anything else is a `WeightConversionError`."""
    if "embeddings.patch_embeddings.weight" in sd:
        return "hf"
    if "storage_tokens" in sd or "rope_embed.periods" in sd:
        return "official"
    if "patch_embed.proj.weight" in sd and "blocks.0.gamma_1" in sd:
        return "timm"
    sample = ", ".join(sorted(sd)[:8])
    raise WeightConversionError(f"not a DINOv3 ViT state dict (transformers, official or timm names); "
                                f"first keys: {sample}")


def _split_qkv(sd: dict, prefix: str, target: str) -> None:
    """Fused qkv.weight/bias under `prefix` -> transformers' {q,k,v}_proj under `target`."""
    for kind in ("weight", "bias"):
        fused = sd.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            for name, part in zip("qkv", np.split(fused, 3, axis=0)):
                sd[f"{target}{name}_proj.{kind}"] = part


def canonical_names(state_dict: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """The state dict under transformers' `DINOv3ViTModel` names."""
    sd = {k: v for k, v in state_dict.items() if not any(re.search(p, k) for p in _NOT_WEIGHTS)}
    if layout == "hf":
        # transformers 5 nests the blocks in an encoder module (`model.layer.i`); earlier releases and
        # the published checkpoints name them `layer.i`.
        return {k.removeprefix("model."): v for k, v in sd.items()}
    if layout == "official" and "rope_embed.periods" in state_dict:
        sd["rope_embed.periods"] = state_dict["rope_embed.periods"]  # checked in `from_dinov3`
    out = {}
    block_renames = {
        "official": [("attn.proj.", "attention.o_proj."), ("ls1.gamma", "layer_scale1.lambda1"),
                     ("ls2.gamma", "layer_scale2.lambda1"), ("mlp.fc1.", "mlp.up_proj."),
                     ("mlp.fc2.", "mlp.down_proj."), ("mlp.w1.", "mlp.gate_proj."),
                     ("mlp.w2.", "mlp.up_proj."), ("mlp.w3.", "mlp.down_proj.")],
        "timm": [("attn.proj.", "attention.o_proj."), ("gamma_1", "layer_scale1.lambda1"),
                 ("gamma_2", "layer_scale2.lambda1"), ("mlp.fc1_g.", "mlp.gate_proj."),
                 ("mlp.fc1_x.", "mlp.up_proj."), ("mlp.fc1.", "mlp.up_proj."), ("mlp.fc2.", "mlp.down_proj."),
                 ("attn.q_bias", "attention.q_proj.bias"), ("attn.v_bias", "attention.v_proj.bias")],
    }[layout]
    top = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
           "reg_token": "embeddings.register_tokens", "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.bias"}
    for key, value in sd.items():
        block = re.match(r"blocks\.(\d+)\.(.*)", key)
        if block is None:
            out[top.get(key, key)] = value
            continue
        rest = block.group(2)
        for old, new in block_renames:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[f"layer.{block.group(1)}.{rest}"] = value
    for i in {int(m.group(1)) for k in out if (m := re.match(r"layer\.(\d+)\.attn\.qkv\.", k))}:
        _split_qkv(out, f"layer.{i}.attn.", f"layer.{i}.attention.")
    return out


def _infer(sd: Mapping[str, np.ndarray], num_heads: int | None) -> dict:
    width, in_channels, patch, patch_w = sd["embeddings.patch_embeddings.weight"].shape
    if patch != patch_w:
        raise WeightConversionError(f"only square patches are supported, got {patch}x{patch_w}")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"layer\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise WeightConversionError("the state dict has no transformer blocks")
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH:
            raise WeightConversionError(f"cannot infer the number of heads for width {width}; pass num_heads=")
        num_heads = _HEADS_BY_WIDTH[width]
    registers = sd.get("embeddings.register_tokens")
    gated = "layer.0.mlp.gate_proj.weight" in sd
    config = dict(FAMILIES["dinov3"])
    config.pop("pretrain_size")
    grid = 224 // patch  # unused by RoPE; kept so the config names a valid ViT
    config.update(
        width=int(width), depth=depth, num_heads=int(num_heads),
        mlp_dim=int(sd["layer.0.mlp.up_proj.weight"].shape[0]) if "layer.0.mlp.up_proj.weight" in sd else 0,
        mlp_type="swiglu" if gated else "gelu", patch_size=int(patch), posemb_grid=(grid, grid),
        in_channels=int(in_channels), num_cls_tokens=1,
        num_registers=0 if registers is None else int(registers.shape[1]),
        qkv_bias="layer.0.attention.q_proj.bias" in sd, final_norm=True)
    return config


def _params(sd: dict, config: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """jaxseg params from transformers names, popping what it uses; also the names it missed."""
    missing = []
    width, heads = config["width"], config["num_heads"]
    head_dim = width // heads

    def take(name):
        if name not in sd:
            missing.append(name)
            return np.zeros((0,), np.float32)
        return np.asarray(sd.pop(name), np.float32)

    def norm(name):
        return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

    def linear(name):
        return {"kernel": take(f"{name}.weight").T, "bias": take(f"{name}.bias")}

    params = {"patch_embed": {"kernel": take("embeddings.patch_embeddings.weight").transpose(2, 3, 1, 0),
                              "bias": take("embeddings.patch_embeddings.bias")},
              "cls_token": take("embeddings.cls_token")}
    if config["num_registers"]:
        params["reg_token"] = take("embeddings.register_tokens")
    else:
        sd.pop("embeddings.register_tokens", None)  # transformers keeps a (1, 0, D) tensor
    for i in range(config["depth"]):
        prefix = f"layer.{i}."
        attn = {}
        for name, target in zip("qkv", ("query", "key", "value")):
            kernel = take(f"{prefix}attention.{name}_proj.weight")
            attn[target] = {"kernel": kernel.T.reshape(width, heads, head_dim)}
            bias = sd.pop(f"{prefix}attention.{name}_proj.bias", None)
            if config["qkv_bias"] and (name != "k" or config["key_bias"]):
                if bias is None:
                    missing.append(f"{prefix}attention.{name}_proj.bias")
                else:
                    attn[target]["bias"] = np.asarray(bias, np.float32).reshape(heads, head_dim)
        out = linear(f"{prefix}attention.o_proj")
        attn["out"] = {"kernel": out["kernel"].reshape(heads, head_dim, width), "bias": out["bias"]}
        if config["mlp_type"] == "swiglu":
            mlp = {"fc1_gate": linear(f"{prefix}mlp.gate_proj"), "fc1_up": linear(f"{prefix}mlp.up_proj")}
        else:
            mlp = {"fc1": linear(f"{prefix}mlp.up_proj")}
        mlp["fc2"] = linear(f"{prefix}mlp.down_proj")
        params[f"blocks_{i}"] = {
            "norm1": norm(f"{prefix}norm1"), "norm2": norm(f"{prefix}norm2"), "attn": attn, "mlp": mlp,
            "ls1": {"gamma": take(f"{prefix}layer_scale1.lambda1")},
            "ls2": {"gamma": take(f"{prefix}layer_scale2.lambda1")}}
    if config["final_norm"]:
        params["norm"] = norm("norm")
    else:
        sd.pop("norm.weight", None), sd.pop("norm.bias", None)
    return params, missing


def from_dinov3(state_dict: Mapping[str, Any], hf_config: Any = None, **overrides) -> tuple[dict, dict]:
    """Converts a DINOv3 ViT state dict (transformers, official or timm layout) to `(model_config,
    params)` for `ViT(**model_config)`.

    Settings the tensors do not hold come from `hf_config` (a transformers `DINOv3ViTConfig` or a dict of
    its fields: heads, norm eps, RoPE base and augmentation) when given, else from the "dinov3" family
    (`jaxseg.models.vit.FAMILIES`); `overrides` set them explicitly (see `_OPTIONS`).
    """
    sd = unwrap(state_dict)
    layout = detect_layout(sd)
    unknown = set(overrides) - set(_OPTIONS)
    if unknown:
        raise UserError(f"unknown from_dinov3 option(s) {sorted(unknown)}; valid: {sorted(_OPTIONS)}")
    settings = {}
    if hf_config is not None:
        get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
        for flag in ("proj_bias", "mlp_bias"):
            if not get(flag, True):
                raise WeightConversionError(f"{flag}=False is not supported: jaxseg's ViT always has a bias "
                                            f"on the attention output and MLP projections")
        if get("hidden_act", "gelu") not in ("gelu", "silu"):
            raise WeightConversionError(f"hidden_act={get('hidden_act')!r} is not supported (gelu, or silu "
                                        f"with the gated MLP)")
        # EomtDinov3Config keeps the RoPE base in `rope_parameters`, DINOv3ViTConfig in `rope_theta`.
        rope_base = get("rope_theta") or (get("rope_parameters") or {}).get("rope_theta")
        settings = {k: v for k, v in dict(num_heads=get("num_attention_heads"),
                                          layernorm_eps=get("layer_norm_eps"), rope_base=rope_base).items()
                    if v is not None}
        settings.update(rope_shift=get("pos_embed_shift"), rope_jitter=get("pos_embed_jitter"),
                        rope_rescale=get("pos_embed_rescale"))
    settings.update(overrides)
    sd = canonical_names(sd, layout)
    config = _infer(sd, settings.pop("num_heads", None))
    config.update(settings)
    periods = sd.pop("rope_embed.periods", None)
    if periods is not None:
        head_dim = config["width"] // config["num_heads"]
        expected = config["rope_base"] ** (4.0 * np.arange(head_dim // 4) / head_dim)
        if periods.shape != expected.shape or not np.allclose(periods, expected, rtol=1e-4):
            raise WeightConversionError(
                f"the checkpoint's RoPE periods are not base {config['rope_base']} ** (4j / {head_dim}) "
                f"(DINOv3's min/max-period form is not supported); pass rope_base= if its base differs")
    if config["width"] % config["num_heads"]:
        raise WeightConversionError(f"width {config['width']} is not divisible by num_heads "
                                    f"{config['num_heads']}")
    params, missing = _params(sd, config)
    if missing or sd:
        lines = [f"  - missing     {k}" for k in missing] + [f"  + unexpected  {k}" for k in sorted(sd)]
        raise WeightConversionError(f"DINOv3 state dict ({layout} layout) does not match a DINOv3 ViT "
                                    f"(width {config['width']}, depth {config['depth']}):\n" + "\n".join(lines))
    check_params(config, params)
    return config, params


def check_params(config: Mapping[str, Any], params: Any) -> None:
    """Raises a `WeightConversionError` listing every name and shape of `params` that `ViT(**config)`
    does not have."""
    size = (config["patch_size"],) * 2
    abstract = jax.eval_shape(lambda: ViT(**config).init(jax.random.key(0), np.zeros((1, *size, 3),
                                                                                      np.float32)))
    expected = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract)["params"], sep="/")
    actual = flax.traverse_util.flatten_dict(params, sep="/")
    diff = shape_diff({k: v.shape for k, v in expected.items()}, {k: np.shape(v) for k, v in actual.items()})
    if diff:
        raise WeightConversionError("converted DINOv3 params do not match the model:\n" + "\n".join(diff))
