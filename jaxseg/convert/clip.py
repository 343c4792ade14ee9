"""CLIP checkpoints (ViT image tower) -> jaxseg `CLIP` params, from the two layouts in use:

  OpenAI `clip` / open_clip `CLIP`*        transformers `CLIPModel`                            jaxseg
  visual.conv1.weight (D, 3, p, p)         vision_model.embeddings.patch_embedding.weight      vision/patch_embed/kernel
  visual.class_embedding (D,)              vision_model.embeddings.class_embedding             vision/cls_token
  visual.positional_embedding (1 + P, D)   vision_model.embeddings.position_embedding.weight   vision/pos_embed
  visual.ln_pre / ln_post                  vision_model.pre_layrnorm / post_layernorm          vision/norm_pre / norm
  visual.transformer.resblocks.i.          vision_model.encoder.layers.i.                      vision/blocks_i/
    ln_1, ln_2                               layer_norm1, layer_norm2                            norm1, norm2
    attn.in_proj_weight / bias (3D, D)       self_attn.{q,k,v}_proj                              attn/{query,key,value}
    attn.out_proj                            self_attn.out_proj                                  attn/out
    mlp.c_fc, mlp.c_proj                     mlp.fc1, mlp.fc2                                    mlp/fc1, mlp/fc2
  visual.proj (D, E)                       visual_projection.weight (E, D)                     image_projection (D, E)
  token_embedding.weight                   text_model.embeddings.token_embedding.weight        text/token_embedding
  positional_embedding (L, Dt)             text_model.embeddings.position_embedding.weight     text/pos_embed
  transformer.resblocks.i.*                text_model.encoder.layers.i.*                       text/blocks_i/*
  ln_final                                 text_model.final_layer_norm                         text/ln_final
  text_projection (Dt, E)                  text_projection.weight (E, Dt)                      text/projection
  logit_scale                              logit_scale                                         logit_scale

* open_clip's `CustomTextCLIP` keeps the text tower under `text.`; both spellings are read.
Both layouts are first renamed onto one canonical layout whose blocks carry timm's names (`norm1`,
`attn.qkv`, `attn.proj`, `mlp.fc1`, ...), so that the blocks convert with `block_from_timm`; a name diff in
that layout (with the checkpoint's own names for what is unexpected or misshaped) explains any mismatch.

Not stored in the tensors: the heads (OpenAI's rule, width / 64, unless given), the MLP activation
(QuickGELU for OpenAI's weights and transformers' configs; open_clip's non-"quickgelu" models use GELU,
`mlp_type="gelu"`), the LayerNorm eps (1e-5) and how the position embedding is resampled for other image
sizes (default "bilinear", as CLIP-ES does).
OpenAI's released `ViT-B-16.pt` is a TorchScript archive, which jaxseg does not read (it never unpickles
code); save its `state_dict()` first (docs/clip_es.md), or use transformers' `openai/clip-vit-base-patch16`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from jaxseg.convert.state_dict import WeightConversionError, shape_diff, unwrap
from jaxseg.convert.timm import block_from_timm
from jaxseg.errors import UserError
from jaxseg.models.clip import CLIP, clip_vision_config
from jaxseg.models.vit import ViT

LAYOUTS = ("openai", "hf")
# Options a converted model may take; everything else is fixed by the tensors.
_OPTIONS = ("vision_num_heads", "text_num_heads", "mlp_type", "layernorm_eps", "posemb_resize")
# Buffers and bookkeeping saved next to the weights.
_NOT_WEIGHTS = (r"(^|\.)position_ids$", r"^(text\.)?attn_mask$", r"^input_resolution$", r"^context_length$",
                r"^vocab_size$")

_TOP_RENAMES = {
    "openai": [
        (r"^visual\.conv1\.weight$", "visual.patch_embed"),
        (r"^visual\.class_embedding$", "visual.cls_token"),
        (r"^visual\.positional_embedding$", "visual.pos_embed"),
        (r"^visual\.ln_pre\.", "visual.norm_pre."),
        (r"^visual\.ln_post\.", "visual.norm."),
        (r"^visual\.proj$", "visual.proj"),
        (r"^visual\.transformer\.resblocks\.(\d+)\.", r"visual.blocks.\1."),
        (r"^(text\.)?transformer\.resblocks\.(\d+)\.", r"text.blocks.\2."),
        (r"^(text\.)?token_embedding\.weight$", "text.token_embedding"),
        (r"^(text\.)?positional_embedding$", "text.pos_embed"),
        (r"^(text\.)?ln_final\.", "text.ln_final."),
        (r"^(text\.)?text_projection$", "text.projection"),
        (r"^logit_scale$", "logit_scale"),
    ],
    "hf": [
        (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.patch_embed"),
        (r"^vision_model\.embeddings\.class_embedding$", "visual.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.pos_embed"),
        (r"^vision_model\.pre_layrnorm\.", "visual.norm_pre."),
        (r"^vision_model\.post_layernorm\.", "visual.norm."),
        (r"^visual_projection\.weight$", "visual.proj"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.", r"visual.blocks.\1."),
        (r"^text_model\.encoder\.layers\.(\d+)\.", r"text.blocks.\1."),
        (r"^text_model\.embeddings\.token_embedding\.weight$", "text.token_embedding"),
        (r"^text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
        (r"^text_model\.final_layer_norm\.", "text.ln_final."),
        (r"^text_projection\.weight$", "text.projection"),
        (r"^logit_scale$", "logit_scale"),
    ],
}
_BLOCK_RENAMES = {
    "openai": [("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
               ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")],
    "hf": [("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("self_attn.out_proj.", "attn.proj.")],
}
# transformers stores its projections as Linear weights (out, in); the canonical layout is (in, out).
_TRANSPOSED = {"hf": ("visual.proj", "text.projection")}


def detect_layout(sd: Mapping[str, Any]) -> str:
    """"openai" (OpenAI / open_clip) or "hf" (transformers) for a CLIP state dict; anything else is a
    `WeightConversionError`."""
    if "visual.conv1.weight" in sd:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return "hf"
    sample = ", ".join(sorted(sd)[:8])
    raise WeightConversionError(f"not a CLIP state dict with a ViT image tower (OpenAI / open_clip or "
                                f"transformers names); first keys: {sample}")


def canonical_names(state_dict: Mapping[str, np.ndarray], layout: str) -> tuple[dict, dict]:
    """(the state dict under canonical names, {canonical name: the checkpoint's name(s)}). Names that no
    rule knows keep their own name (and show up as unexpected)."""
    sd, origin = {}, {}
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in _NOT_WEIGHTS):
            continue
        name = key
        for pattern, replacement in _TOP_RENAMES[layout]:
            if re.search(pattern, key):
                name = re.sub(pattern, replacement, key)
                break
        block = re.match(r"(visual|text)\.blocks\.\d+\.", name)
        if block and name != key:
            rest = name[block.end():]
            for old, new in _BLOCK_RENAMES[layout]:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = block.group(0) + rest
        if name in _TRANSPOSED.get(layout, ()):
            value = value.T
        sd[name], origin[name] = value, key
    if layout == "hf":
        _fuse_qkv(sd, origin)
    return sd, origin


def _fuse_qkv(sd: dict, origin: dict) -> None:
    """transformers' separate q/k/v projections -> one qkv, timm's (and OpenAI's) layout."""
    prefixes = {m.group(1) for k in sd if (m := re.match(r"(.*\.)self_attn\.q_proj\.weight$", k))}
    for prefix in prefixes:
        for kind in ("weight", "bias"):
            names = [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if all(n in sd for n in names):
                sd[f"{prefix}attn.qkv.{kind}"] = np.concatenate([sd.pop(n) for n in names])
                origin[f"{prefix}attn.qkv.{kind}"] = " + ".join(origin.pop(n) for n in names)


def _heads(width: int, given: int | None, tower: str) -> int:
    heads = given if given is not None else width // 64
    if heads < 1 or width % heads:
        raise WeightConversionError(f"the {tower} tower's width {width} does not split into heads of 64 "
                                    f"channels (OpenAI's rule); pass {tower}_num_heads=")
    return heads


def _infer(sd: Mapping[str, np.ndarray], settings: Mapping[str, Any]) -> dict:
    needed = ("visual.patch_embed", "visual.pos_embed", "text.token_embedding", "text.pos_embed",
              "text.projection")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise WeightConversionError(f"the CLIP state dict lacks {absent} (canonical names; see "
                                    f"jaxseg.convert.clip)")
    width, in_channels, patch, patch_w = sd["visual.patch_embed"].shape
    if patch != patch_w:
        raise WeightConversionError(f"only square patches are supported, got {patch}x{patch_w}")
    grid = math.isqrt(sd["visual.pos_embed"].shape[0] - 1)
    if grid * grid + 1 != sd["visual.pos_embed"].shape[0]:
        raise WeightConversionError(f"the image position embedding has {sd['visual.pos_embed'].shape[0]} rows, "
                                    f"not a class entry + a square grid")

    def depth(tower):
        return 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"{tower}\.blocks\.(\d+)\.", k))),
                       default=-1)

    def mlp_dim(tower):
        fc1 = sd.get(f"{tower}.blocks.0.mlp.fc1.weight")
        if fc1 is None:
            raise WeightConversionError(f"the {tower} tower has no blocks (no '{tower}.blocks.0.mlp.fc1.weight' "
                                        f"in canonical names)")
        return int(fc1.shape[0])

    common = {k: settings[k] for k in ("mlp_type", "layernorm_eps") if k in settings}
    vision = clip_vision_config(
        width=int(width), depth=depth("visual"), num_heads=_heads(int(width), settings.get("vision_num_heads"),
                                                                  "vision"),
        patch_size=int(patch), image_size=grid * int(patch), mlp_dim=mlp_dim("visual"),
        in_channels=int(in_channels), **common)
    if "posemb_resize" in settings:
        vision["posemb_resize"] = settings["posemb_resize"]
    vocab_size, text_width = sd["text.token_embedding"].shape
    text = dict(vocab_size=int(vocab_size), context_length=int(sd["text.pos_embed"].shape[0]),
                width=int(text_width), depth=depth("text"),
                num_heads=_heads(int(text_width), settings.get("text_num_heads"), "text"),
                mlp_dim=mlp_dim("text"), **common)
    return dict(vision=vision, text=text, embed_dim=int(sd["text.projection"].shape[1]))


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple]:
    """Canonical names and shapes of a CLIP checkpoint of this config."""
    vision, text, embed = config["vision"], config["text"], config["embed_dim"]
    d, p = vision["width"], vision["patch_size"]
    grid = vision["posemb_grid"]
    shapes = {"visual.patch_embed": (d, vision.get("in_channels", 3), p, p), "visual.cls_token": (d,),
              "visual.pos_embed": (1 + grid[0] * grid[1], d), "visual.proj": (d, embed),
              "text.token_embedding": (text["vocab_size"], text["width"]),
              "text.pos_embed": (text["context_length"], text["width"]),
              "text.projection": (text["width"], embed), "logit_scale": ()}
    for prefix, width in (("visual.norm_pre", d), ("visual.norm", d), ("text.ln_final", text["width"])):
        shapes.update({f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)})
    for tower, cfg in (("visual", vision), ("text", text)):
        width, hidden = cfg["width"], cfg["mlp_dim"]
        for i in range(cfg["depth"]):
            for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)),
                                ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                                ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                                ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                                ("mlp.fc1.weight", (hidden, width)), ("mlp.fc1.bias", (hidden,)),
                                ("mlp.fc2.weight", (width, hidden)), ("mlp.fc2.bias", (width,))):
                shapes[f"{tower}.blocks.{i}.{name}"] = shape
    return shapes


def _params(sd: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict:
    vision, text = config["vision"], config["text"]

    def norm(name):
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

    def blocks(tower, cfg):
        return {f"blocks_{i}": block_from_timm(sd, f"{tower}.blocks.{i}.", cfg["num_heads"])
                for i in range(cfg["depth"])}

    width = vision["width"]
    return {
        "vision": {"patch_embed": {"kernel": sd["visual.patch_embed"].transpose(2, 3, 1, 0)},
                   "cls_token": sd["visual.cls_token"].reshape(1, 1, width),
                   "pos_embed": sd["visual.pos_embed"][None],
                   "norm_pre": norm("visual.norm_pre"), "norm": norm("visual.norm"), **blocks("visual", vision)},
        "image_projection": sd["visual.proj"],
        "text": {"token_embedding": {"embedding": sd["text.token_embedding"]}, "pos_embed": sd["text.pos_embed"],
                 "ln_final": norm("text.ln_final"), "projection": sd["text.projection"], **blocks("text", text)},
        "logit_scale": sd["logit_scale"].reshape(()),
    }


def _field(config: Any, key: str) -> Any:
    """A field of a transformers config object or of the dict of its config.json (None when absent)."""
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _hf_settings(hf_config: Any) -> dict:
    """Heads, activation and eps from a transformers `CLIPConfig` (or the dict of its config.json)."""
    towers = {}
    for tower in ("vision", "text"):
        towers[tower] = _field(hf_config, f"{tower}_config")
        if towers[tower] is None:
            raise UserError(f"the transformers CLIP config has no {tower}_config")
    # config.json leaves out fields at their defaults: QuickGELU and eps 1e-5.
    acts = {_field(s, "hidden_act") or "quick_gelu" for s in towers.values()}
    eps = {_field(s, "layer_norm_eps") or 1e-5 for s in towers.values()}
    if len(acts) > 1 or len(eps) > 1:
        raise WeightConversionError(f"the two towers differ in activation {sorted(acts)} or norm eps "
                                    f"{sorted(eps)}; jaxseg's CLIP takes one of each")
    settings = dict(mlp_type=acts.pop(), layernorm_eps=float(eps.pop()))
    if settings["mlp_type"] not in ("quick_gelu", "gelu"):
        raise WeightConversionError(f"hidden_act={settings['mlp_type']!r} is not supported (quick_gelu or gelu)")
    for tower, section in towers.items():
        heads = _field(section, "num_attention_heads")
        if heads is not None:
            settings[f"{tower}_num_heads"] = int(heads)
    return settings


def from_clip(state_dict: Mapping[str, Any], hf_config: Any = None, **overrides) -> tuple[dict, dict]:
    """Converts a CLIP state dict (OpenAI / open_clip or transformers layout, ViT image tower) to
    `(model_config, params)` for `CLIP(**model_config)`.

    Settings the tensors do not hold come from `hf_config` (a transformers `CLIPConfig` or the dict of its
    config.json) when given, else OpenAI's defaults; `overrides` set them explicitly: `vision_num_heads`,
    `text_num_heads`, `mlp_type` ("quick_gelu" or "gelu"), `layernorm_eps`, `posemb_resize`.

    Raises:
      WeightConversionError: not a CLIP state dict, or a name / shape diff against the inferred model.
    """
    unknown = set(overrides) - set(_OPTIONS)
    if unknown:
        raise UserError(f"unknown from_clip option(s) {sorted(unknown)}; valid: {sorted(_OPTIONS)}")
    sd = unwrap(state_dict)
    layout = detect_layout(sd)
    if "logit_bias" in sd:
        raise WeightConversionError("the state dict has a 'logit_bias' (a SigLIP-style model): jaxseg's CLIP has "
                                    "the softmax-contrastive logit scale only")
    settings = _hf_settings(hf_config) if hf_config is not None else {}
    settings.update(overrides)
    sd, origin = canonical_names(sd, layout)
    config = _infer(sd, settings)
    expected = _expected_shapes(config)
    diff = shape_diff(expected, {k: np.shape(v) for k, v in sd.items()}, origin)
    if diff:
        raise WeightConversionError(
            f"CLIP state dict ({layout} layout) does not match a CLIP with image width "
            f"{config['vision']['width']}, depth {config['vision']['depth']} and text width "
            f"{config['text']['width']}, depth {config['text']['depth']} (canonical names, see "
            f"jaxseg.convert.clip):\n" + "\n".join(diff))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), _params(sd, config))
    check_params(config, params)
    return config, params


def abstract_params(config: Mapping[str, Any]) -> dict:
    """Parameter shapes of `CLIP(**config)` (nothing is allocated)."""
    vision = ViT(**config["vision"])
    size = tuple(g * vision.patch_size for g in vision.posemb_grid)
    abstract = jax.eval_shape(lambda: CLIP(**config).init(
        jax.random.key(0), np.zeros((1, *size, vision.in_channels), np.float32), np.zeros((1, 2), np.int32)))
    return flax.linen.unbox(abstract)["params"]


def check_params(config: Mapping[str, Any], params: Any) -> None:
    """Raises an AssertionError listing every name and shape of `params` that `CLIP(**config)` lacks (a
    bug here: the checkpoint was already checked)."""
    expected = flax.traverse_util.flatten_dict(abstract_params(config), sep="/")
    actual = flax.traverse_util.flatten_dict(params, sep="/")
    diff = shape_diff({k: v.shape for k, v in expected.items()}, {k: np.shape(v) for k, v in actual.items()})
    if diff:
        raise AssertionError("converted CLIP params do not match the model:\n" + "\n".join(diff))
