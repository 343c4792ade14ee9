"""timm `VisionTransformer` state dicts (DeiT, DINOv2, DINOv2 with registers) <-> jaxseg ViT params.

Tensor layouts (timm -> jaxseg):
  patch_embed.proj.weight (D, C, p, p)      -> patch_embed/kernel (p, p, C, D)
  cls_token / reg_token / pos_embed          -> same names and shapes
  blocks.i.attn.qkv.weight (3*D, D)          -> blocks_i/attn/{query,key,value}/kernel (D, heads, head_dim)
  blocks.i.attn.qkv.bias (3*D,)              -> blocks_i/attn/{query,key,value}/bias (heads, head_dim)
  blocks.i.attn.proj.weight (D, D)           -> blocks_i/attn/out/kernel (heads, head_dim, D)
  blocks.i.mlp.fc{1,2}.weight (out, in)      -> blocks_i/mlp/fc{1,2}/kernel (in, out)
  blocks.i.mlp.fc1.weight (2*M, D), SwiGLU   -> blocks_i/mlp/fc1_gate (first half), fc1_up (second half)
  blocks.i.ls{1,2}.gamma                     -> blocks_i/ls{1,2}/gamma
  *.norm*.weight / bias                      -> */norm*/scale / bias
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.errors import UserError
from jaxseg.models.vit import ViT
from jaxseg.ops.posemb import resample_patch_kernel, resample_posemb

log = logging.getLogger(__name__)

# Classification heads and training-only entries: present in most checkpoints, unused by jaxseg.
DEFAULT_IGNORE = (r"^head\.", r"^head_dist\.", r"^fc_norm\.", r"^mask_token$")

# Heads of the standard widths; other widths need `num_heads=`.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# Fixed by the tensors: an override may restate them but not change them.
_STRUCTURAL = ("width", "depth", "mlp_dim", "mlp_type", "in_channels", "num_registers", "qkv_bias")
# Changed by resampling or re-arranging the tensors, or not stored in them. `num_cls_tokens` repeats a
# single class token (WeakTr / MCTformer: one per class, each starting as DeiT's).
_ADJUSTABLE = ("patch_size", "posemb_grid", "image_size", "posemb_covers_prefix", "num_heads",
               "layernorm_eps", "final_norm", "drop_path_rate", "dropout_rate",
               "attention_dropout_rate", "dtype", "param_dtype", "remat", "posemb_resize",
               "num_cls_tokens")


def _canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps the original DINOv2 release layout onto timm's, as timm's `_convert_dinov2` does:
    its position embedding has a class entry but no register entries, which no timm layout has, so the
    class entry is folded into the class token."""
    sd = dict(state_dict)
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
            for k, v in sd.items()}


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def infer_config(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None,
                 grid: Sequence[int] | None = None, posemb_covers_prefix: bool | None = None) -> dict:
    """The ViT keyword arguments that a timm state dict was saved from.

    The head count is not stored in the tensors: standard widths imply it, others need `num_heads`.
    A non-square position-embedding grid needs `grid`; a length that fits both layouts (with and
    without prefix entries) needs `posemb_covers_prefix`.
    """
    if "patch_embed.proj.weight" not in state_dict:
        sample = ", ".join(sorted(state_dict)[:8])
        raise WeightConversionError(
            f"not a timm ViT state dict: no 'patch_embed.proj.weight' (first keys: {sample})")
    width, in_channels, ph, pw = state_dict["patch_embed.proj.weight"].shape
    if ph != pw:
        raise WeightConversionError(f"only square patches are supported, got {ph}x{pw}")
    depth = 1 + max((int(m.group(1)) for k in state_dict
                     if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise WeightConversionError("the state dict has no 'blocks.<i>.' entries")
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH:
            raise WeightConversionError(f"cannot infer the number of heads for width {width}; "
                                        f"pass num_heads=")
        num_heads = _HEADS_BY_WIDTH[width]

    def tokens(name):
        return state_dict[name].shape[1] if name in state_dict else 0

    num_cls, num_reg = tokens("cls_token"), tokens("reg_token")
    num_pos = tokens("pos_embed")
    if "pos_embed" not in state_dict:
        raise WeightConversionError("the state dict has no 'pos_embed' (absolute position embedding)")
    candidates = {False: num_pos, True: num_pos - num_cls - num_reg}
    if posemb_covers_prefix is None:
        if grid is not None:
            fits = [c for c, n in candidates.items() if n == grid[0] * grid[1]]
        else:
            fits = [c for c, n in candidates.items() if n > 0 and _square_side(n)]
        if len(fits) != 1:
            raise WeightConversionError(
                f"cannot tell from pos_embed length {num_pos} (with {num_cls + num_reg} prefix tokens) "
                f"whether it covers the prefix tokens" + (f" for grid {tuple(grid)}" if grid else "")
                + "; pass posemb_covers_prefix= (and grid= for a non-square grid)")
        posemb_covers_prefix = fits[0]
    num_patches = candidates[posemb_covers_prefix]
    if grid is None:
        side = _square_side(num_patches)
        if side is None:
            raise WeightConversionError(f"pos_embed holds {num_patches} patch entries, not a square grid; "
                                        f"pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != num_patches:
        raise WeightConversionError(f"grid {tuple(grid)} does not match the {num_patches} patch entries "
                                    f"of pos_embed")

    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    fc2 = state_dict.get("blocks.0.mlp.fc2.weight")
    if fc1 is None or fc2 is None:
        raise WeightConversionError("the state dict has no 'blocks.0.mlp.fc1/fc2.weight'")
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]
    return dict(
        width=int(width), depth=depth, num_heads=int(num_heads),
        mlp_dim=int(fc2.shape[1]), mlp_type="swiglu" if swiglu else "gelu",
        patch_size=int(ph), posemb_grid=tuple(int(g) for g in grid), in_channels=int(in_channels),
        num_cls_tokens=int(num_cls), num_registers=int(num_reg),
        posemb_covers_prefix=bool(posemb_covers_prefix),
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        final_norm="norm.weight" in state_dict,
        layernorm_eps=1e-6)  # not stored in the weights; timm's ViTs use 1e-6


def abstract_params(config: Mapping[str, Any]) -> dict:
    """Parameter shapes of `ViT(**config)` (nothing is allocated)."""
    model = ViT(**config)
    grid = config["posemb_grid"]
    images = jax.ShapeDtypeStruct((1, grid[0] * config["patch_size"], grid[1] * config["patch_size"],
                                   config.get("in_channels", 3)), jnp.float32)
    variables = jax.eval_shape(lambda im: model.init(jax.random.key(0), im), images)
    return nn.unbox(variables)["params"]


def _norm_to_timm(p):
    return {"weight": p["scale"], "bias": p["bias"]}


def _linear_to_timm(p):
    return {"weight": p["kernel"].T, "bias": p["bias"]}


def to_timm(params: Mapping, config: Mapping[str, Any]) -> dict[str, jax.Array]:
    """jaxseg ViT params -> timm state dict (names and layouts of timm's `VisionTransformer`)."""
    sd = {"patch_embed.proj": {"weight": jnp.transpose(params["patch_embed"]["kernel"], (3, 2, 0, 1)),
                               "bias": params["patch_embed"]["bias"]},
          "pos_embed": params["pos_embed"]}
    for name in ("cls_token", "reg_token"):
        if name in params:
            sd[name] = params[name]
    if "norm" in params:
        sd["norm"] = _norm_to_timm(params["norm"])
    for i in range(config["depth"]):
        block = params[f"blocks_{i}"]
        attn = block["attn"]
        width = attn["out"]["kernel"].shape[-1]
        qkv_weight = jnp.concatenate([jnp.transpose(attn[n]["kernel"], (1, 2, 0)).reshape(width, width)
                                      for n in ("query", "key", "value")], axis=0)
        qkv = {"weight": qkv_weight}
        if "bias" in attn["query"]:
            qkv["bias"] = jnp.concatenate([attn[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
        mlp = block["mlp"]
        if "fc1" in mlp:
            fc1 = _linear_to_timm(mlp["fc1"])
        else:
            fc1 = {"weight": jnp.concatenate([mlp["fc1_gate"]["kernel"], mlp["fc1_up"]["kernel"]], 1).T,
                   "bias": jnp.concatenate([mlp["fc1_gate"]["bias"], mlp["fc1_up"]["bias"]])}
        entries = {
            "norm1": _norm_to_timm(block["norm1"]), "norm2": _norm_to_timm(block["norm2"]),
            "attn.qkv": qkv,
            "attn.proj": {"weight": attn["out"]["kernel"].reshape(width, width).T,
                          "bias": attn["out"]["bias"]},
            "mlp.fc1": fc1, "mlp.fc2": _linear_to_timm(mlp["fc2"])}
        for ls in ("ls1", "ls2"):
            if ls in block:
                entries[ls] = {"gamma": block[ls]["gamma"]}
        sd.update({f"blocks.{i}.{k}": v for k, v in entries.items()})
    flat = {}
    for key, value in sd.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{leaf}": v for leaf, v in value.items()})
        else:
            flat[key] = value
    return flat


def layer_norm_from_torch(sd, prefix):
    """Flax LayerNorm params of torch's `<prefix>.{weight,bias}`."""
    return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}


def linear_from_torch(sd, prefix):
    """Flax Dense params of torch's Linear `<prefix>.{weight (out, in),bias}`."""
    return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}


def block_from_timm(sd: Mapping[str, np.ndarray], prefix: str, num_heads: int, *,
                    mlp_type: str = "gelu", layerscale: bool = False) -> dict:
    """Params of one jaxseg `Block` from the timm-layout block entries under `prefix` (e.g. "blocks.3.");
    also fits other timm-style blocks (Segmenter's decoder). qkv bias is taken when present."""
    width = sd[prefix + "attn.proj.weight"].shape[0]
    head_dim = width // num_heads
    qkv_weight = sd[prefix + "attn.qkv.weight"].reshape(3, num_heads, head_dim, width)
    attn = {n: {"kernel": qkv_weight[j].transpose(2, 0, 1)} for j, n in enumerate(("query", "key", "value"))}
    if prefix + "attn.qkv.bias" in sd:
        qkv_bias = sd[prefix + "attn.qkv.bias"].reshape(3, num_heads, head_dim)
        for j, n in enumerate(("query", "key", "value")):
            attn[n]["bias"] = qkv_bias[j]
    attn["out"] = {"kernel": sd[prefix + "attn.proj.weight"].T.reshape(num_heads, head_dim, width),
                   "bias": sd[prefix + "attn.proj.bias"]}
    if mlp_type == "swiglu":
        gate, up = np.split(sd[prefix + "mlp.fc1.weight"], 2, axis=0)
        gate_bias, up_bias = np.split(sd[prefix + "mlp.fc1.bias"], 2)
        mlp = {"fc1_gate": {"kernel": gate.T, "bias": gate_bias}, "fc1_up": {"kernel": up.T, "bias": up_bias}}
    else:
        mlp = {"fc1": linear_from_torch(sd, prefix + "mlp.fc1")}
    mlp["fc2"] = linear_from_torch(sd, prefix + "mlp.fc2")
    block = {"norm1": layer_norm_from_torch(sd, prefix + "norm1"), "norm2": layer_norm_from_torch(sd, prefix + "norm2"),
             "attn": attn, "mlp": mlp}
    if layerscale:
        block["ls1"] = {"gamma": sd[prefix + "ls1.gamma"]}
        block["ls2"] = {"gamma": sd[prefix + "ls2.gamma"]}
    return block


def _from_timm_tensors(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict:
    """The inverse of `to_timm` for a state dict already checked against `config`."""
    params = {"patch_embed": {"kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                              "bias": sd["patch_embed.proj.bias"]},
              "pos_embed": sd["pos_embed"]}
    for name in ("cls_token", "reg_token"):
        if name in sd:
            params[name] = sd[name]
    if config["final_norm"]:
        params["norm"] = layer_norm_from_torch(sd, "norm")
    for i in range(config["depth"]):
        params[f"blocks_{i}"] = block_from_timm(sd, f"blocks.{i}.", config["num_heads"],
                                                mlp_type=config["mlp_type"],
                                                layerscale=config["layerscale_init"] is not None)
    return params


def _target_config(source: dict, overrides: dict) -> dict:
    unknown = set(overrides) - set(_STRUCTURAL) - set(_ADJUSTABLE)
    if unknown:
        raise UserError(f"unknown from_timm option(s) {sorted(unknown)}; valid: "
                        f"{sorted(_STRUCTURAL + _ADJUSTABLE)}")
    for key in _STRUCTURAL:
        if key in overrides and overrides[key] != source[key]:
            raise WeightConversionError(f"the state dict fixes {key}={source[key]!r}; cannot convert "
                                        f"to {key}={overrides[key]!r}")
    target = dict(source)
    target.update((k, v) for k, v in overrides.items() if k != "image_size")
    if overrides.get("final_norm") and not source["final_norm"]:
        raise WeightConversionError("final_norm=True but the state dict has no 'norm.weight'")
    if target["num_cls_tokens"] != source["num_cls_tokens"] and (
            source["num_cls_tokens"] != 1 or target["num_cls_tokens"] < 1):
        raise WeightConversionError(
            f"cannot convert the state dict's {source['num_cls_tokens']} class token(s) to num_cls_tokens="
            f"{target['num_cls_tokens']}: only a single class token can be repeated, to 1 or more")
    patch = target["patch_size"]
    if "image_size" in overrides:
        size = overrides["image_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] % patch or size[1] % patch:
            raise UserError(f"image_size {size} is not divisible by patch_size {patch}")
        if "posemb_grid" in overrides and tuple(overrides["posemb_grid"]) != (size[0] // patch,
                                                                           size[1] // patch):
            raise UserError(f"image_size {size} and posemb_grid {overrides['posemb_grid']} disagree")
        target["posemb_grid"] = (size[0] // patch, size[1] // patch)
    target["posemb_grid"] = tuple(int(g) for g in target["posemb_grid"])
    return target


def _adapt_geometry(params: dict, source: dict, target: dict) -> dict:
    """Resamples the patch kernel and position embedding, repeats a single class token (with its position
    entry) when asked, and moves prefix position entries."""
    params = dict(params)
    if target["patch_size"] != source["patch_size"]:
        log.info("resampling patch kernel %d -> %d", source["patch_size"], target["patch_size"])
        kernel = resample_patch_kernel(params["patch_embed"]["kernel"], (target["patch_size"],) * 2)
        params["patch_embed"] = dict(params["patch_embed"], kernel=kernel)
    num_cls = source["num_cls_tokens"]
    num_prefix = num_cls + source["num_registers"]
    posemb = params["pos_embed"]
    source_prefix = num_prefix if source["posemb_covers_prefix"] else 0
    posemb = np.asarray(resample_posemb(jnp.asarray(posemb), source["posemb_grid"],
                                        target["posemb_grid"], source_prefix))
    if target["num_cls_tokens"] != num_cls:
        # MCTformer / WeakTr `main.py`: every class token starts as the single source one, with its
        # position entry (`_target_config` allows only a single source token here).
        num_cls = target["num_cls_tokens"]
        num_prefix = num_cls + source["num_registers"]
        log.info("repeating the class token %d times", num_cls)
        params["cls_token"] = np.repeat(params["cls_token"], num_cls, axis=1)
        if source["posemb_covers_prefix"]:
            posemb = np.concatenate([np.repeat(posemb[:, :1], num_cls, axis=1), posemb[:, 1:]], axis=1)
    if source["posemb_covers_prefix"] and not target["posemb_covers_prefix"]:
        # A position entry of a prefix token is a constant added to that token: fold it in.
        prefix, posemb = posemb[:, :num_prefix], posemb[:, num_prefix:]
        if num_cls:
            params["cls_token"] = params["cls_token"] + prefix[:, :num_cls]
        if source["num_registers"]:
            params["reg_token"] = params["reg_token"] + prefix[:, num_cls:]
    elif target["posemb_covers_prefix"] and not source["posemb_covers_prefix"]:
        posemb = np.concatenate([np.zeros((1, num_prefix, posemb.shape[-1]), posemb.dtype), posemb], 1)
    params["pos_embed"] = posemb
    if source["final_norm"] and not target["final_norm"]:
        log.info("dropping the final norm weights (final_norm=False)")
        del params["norm"]
    return params


def from_timm(state_dict: Mapping[str, Any], *, ignore: Sequence[str] = DEFAULT_IGNORE,
              source_grid: Sequence[int] | None = None,
              source_posemb_covers_prefix: bool | None = None, **overrides) -> tuple[dict, dict]:
    """Converts a timm ViT state dict to `(model_config, params)` for `ViT(**model_config)`.

    This is also the converter for WeakTr's stage-2 encoders (the Segmenter's DeiT-S / ViT-S / DINOv2
    timm weights); official stage-1 checkpoints go through `from_official_weaktr`.

    Args:
      state_dict: {name: torch tensor or numpy array}, as from `load_state_dict` or `model.state_dict()`;
        the original DINOv2 release layout (`register_tokens`, `w12`/`w3`) is accepted too.
      ignore: regexes of names to drop (by default classification heads and DINOv2's mask token).
      source_grid: the (rows, cols) of a non-square position-embedding grid in the state dict.
      source_posemb_covers_prefix: whether the state dict's position embedding has prefix entries,
        for the rare lengths that fit both layouts.
      **overrides: target options. `patch_size` resamples the patch kernel (FlexiViT pseudo-inverse),
        `image_size` or `posemb_grid` resamples the position embedding (bicubic + antialias),
        `posemb_covers_prefix=False` folds class/register position entries into those tokens,
        `num_cls_tokens=C` repeats a single class token and its position entry C times (WeakTr's
        initialisation from DeiT), `final_norm=False` drops the final norm; also `num_heads` (needed
        for non-standard widths), `layernorm_eps`, dropout rates, `dtype`, `param_dtype`, `remat`.

    Raises:
      WeightConversionError: with a diff of missing / unexpected / misshaped names.
    """
    sd = _canonical_keys(unwrap(state_dict))
    if "num_cls_tokens" in overrides and "dist_token" in sd:
        raise WeightConversionError(
            "the state dict has a 'dist_token' (a distilled DeiT), and jaxseg's ViT has no distillation "
            "token to go with the class tokens: convert the non-distilled DeiT (e.g. "
            "deit_small_patch16_224) instead")
    ignored = sorted(k for k in sd if any(re.search(p, k) for p in ignore))
    if ignored:
        log.info("ignoring %d entries: %s", len(ignored), ", ".join(ignored))
    sd = {k: v for k, v in sd.items() if k not in ignored}
    source = infer_config(sd, overrides.get("num_heads"), source_grid, source_posemb_covers_prefix)
    if source["width"] % source["num_heads"]:
        raise WeightConversionError(f"width {source['width']} is not divisible by num_heads "
                                    f"{source['num_heads']}")
    expected = jax.eval_shape(lambda p: to_timm(p, source), abstract_params(source))
    diff = shape_diff({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in sd.items()})
    if diff:
        raise WeightConversionError(
            "state dict does not match a timm ViT with " + _describe(source) + ":\n" + "\n".join(diff))
    target = _target_config(source, overrides)
    params = _adapt_geometry(_from_timm_tensors(sd, source), source, target)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    check = shape_diff(
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x.shape, abstract_params(target)),
                                        sep="/"),
        flax.traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x.shape, params), sep="/"))
    if check:  # a bug in this module rather than in the user's input
        raise AssertionError("converted params do not match the target model:\n" + "\n".join(check))
    return target, params


def _describe(config: Mapping[str, Any]) -> str:
    keys = ("width", "depth", "num_heads", "mlp_type", "patch_size", "posemb_grid", "num_cls_tokens",
            "num_registers", "posemb_covers_prefix")
    return ", ".join(f"{k}={config[k]}" for k in keys)
