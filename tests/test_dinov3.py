"""The jaxseg ViT as DINOv3 against transformers' `DINOv3ViTModel` and timm's DINOv3 `Eva`: random weights
(LayerScale and norms included), CPU, float32, through the converters of every layout.

Compared: the final normed tokens, every block's output and every attention map, at the pretraining size
(64 px, a 4x4 grid at patch 16) and at a non-square size that is not (48 x 80 px, 3 x 5), where RoPE's
per-axis coordinate normalisation matters. Tolerance: 1e-5 relative to the largest reference magnitude.
"""
import flax
import jax
import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from jaxseg.convert import WeightConversionError
from jaxseg.convert.dinov3 import from_dinov3
from jaxseg.models.vit import ViT, vit_config
from jaxseg.ops.rope import augment_coordinates, patch_coordinates, rope_tables
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err

TOL = 1e-5
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=64, patch_size=16, num_register_tokens=4, layer_norm_eps=1e-5)


def _hf_model(**overrides):
    torch.manual_seed(0)
    config = DINOv3ViTConfig(**dict(TINY, **overrides))
    config._attn_implementation = "eager"
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            offset = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "lambda1")) else 0.0
            param.copy_(torch.randn_like(param) * 0.2 + offset)
    return model


def _images(size, seed=1):
    return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def _run_hf(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True,
                    output_attentions=True)
    return (out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states[1:]],
            [a.numpy() for a in out.attentions])


def _errors(config, params, images, reference):
    model = ViT(**config)
    out, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True))(params, images)
    ref_out, ref_blocks, ref_probs = reference
    errors = {"final": rel_err(out, ref_out)}
    errors.update({f"block{i}": rel_err(b, r) for i, (b, r) in enumerate(zip(inter["blocks"], ref_blocks,
                                                                              strict=True))})
    errors.update({f"attn{i}": rel_err(a, r) for i, (a, r) in enumerate(zip(inter["attn_probs"], ref_probs,
                                                                             strict=True))})
    fused, _ = jax.jit(model.apply)({"params": params}, images)  # the fused-attention path
    errors["final_fused"] = rel_err(fused, ref_out)
    return errors


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_matches_transformers(mlp, size, record_property):
    extra = dict(use_gated_mlp=True, hidden_act="silu") if mlp == "swiglu" else {}
    hf = _hf_model(**extra)
    config, params = from_dinov3(hf.state_dict(), hf.config)
    assert config["mlp_type"] == mlp and config["rope_base"] == 100.0 and not config["key_bias"]
    images = _images(size)
    errors = _errors(config, params, images, _run_hf(hf, images))
    record_property("rel_errors", errors)
    assert max(errors.values()) < TOL, errors


def _official_names(hf_state):
    """transformers' names -> the official facebookresearch/dinov3 checkpoint layout (fused qkv with a bias
    mask and a stored RoPE period buffer)."""
    hf_state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    sd = {}
    for key, value in hf_state.items():
        value = value.numpy()
        if key.startswith("layer."):
            _, i, rest = key.split(".", 2)
            for old, new in [("attention.o_proj.", "attn.proj."), ("layer_scale1.lambda1", "ls1.gamma"),
                             ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.up_proj.", "mlp.fc1."),
                             ("mlp.down_proj.", "mlp.fc2.")]:
                rest = rest.replace(old, new)
            if rest.startswith("attention."):
                continue
            sd[f"blocks.{i}.{rest}"] = value
        else:
            sd[{"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
                "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.bias": "patch_embed.proj.bias"}.get(key, key)] = value
    for i in range(TINY["num_hidden_layers"]):
        get = {n: hf_state[f"layer.{i}.attention.{n}_proj.weight"].numpy() for n in "qkv"}
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([get["q"], get["k"], get["v"]])
        # A stored key bias is multiplied by a zero mask in the official model: any value must be ignored.
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([
            hf_state[f"layer.{i}.attention.q_proj.bias"].numpy(), np.full(64, 7.0, np.float32),
            hf_state[f"layer.{i}.attention.v_proj.bias"].numpy()])
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = np.concatenate([np.ones(64), np.zeros(64), np.ones(64)])
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    sd["rope_embed.periods"] = 100.0 ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
    return sd


def test_official_layout_converts_to_the_same_model(record_property):
    hf = _hf_model()
    images = _images((48, 80))
    config, params = from_dinov3(_official_names(hf.state_dict()), layernorm_eps=1e-5, num_heads=4)
    errors = _errors(config, params, images, _run_hf(hf, images))
    record_property("rel_errors", errors)
    assert max(errors.values()) < TOL, errors


def test_timm_layout_matches_timm():
    """timm's DINOv3 (Eva with rope_type='dinov3', SwiGLU and q/v biases) converts and agrees with
    timm's own forward."""
    torch_model = random_timm_vit("vit_small_plus_patch16_dinov3_qkvb",
                                  dict(depth=2, embed_dim=64, num_heads=4, img_size=64))
    config, params = from_dinov3(torch_model.state_dict(), num_heads=4, layernorm_eps=1e-5)
    assert config["mlp_type"] == "swiglu" and config["qkv_bias"]
    images = _images((48, 80))
    with torch.no_grad():
        ref = torch_model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    out, _ = jax.jit(ViT(**config).apply)({"params": params}, images)
    assert rel_err(out, ref) < TOL


def test_rope_tables_follow_the_definition():
    """cos/sin of 2*pi * coordinate / base^(4j/D), y-angles then x-angles, tiled twice."""
    coords = patch_coordinates((2, 3))
    np.testing.assert_allclose(coords[:, 0], [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(coords[:3, 1], [-2 / 3, 0.0, 2 / 3], atol=1e-6)
    cos, sin = rope_tables(coords, 8, 100.0)
    angles = 2 * np.pi * np.concatenate([np.asarray(coords)[:, :1] / [1.0, 10.0],
                                         np.asarray(coords)[:, 1:] / [1.0, 10.0]], axis=1)
    np.testing.assert_allclose(cos, np.cos(np.tile(angles, 2)), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(np.tile(angles, 2)), atol=1e-6)
    np.testing.assert_allclose(patch_coordinates((2, 4), "max")[:, 0], np.repeat([-0.75, -0.25], 4), atol=1e-6)


def test_training_augmentation_rescales_coordinates():
    """One draw per forward pass: shift adds, jitter scales per axis, rescale scales both axes alike."""
    coords = patch_coordinates((3, 3))
    rescaled = augment_coordinates(coords, jax.random.key(0), rescale=2.0)
    ratio = np.asarray(rescaled)[np.asarray(coords) != 0] / np.asarray(coords)[np.asarray(coords) != 0]
    assert np.allclose(ratio, ratio[0]) and 0.5 <= ratio[0] <= 2.0 and ratio[0] != 1.0
    shifted = np.asarray(augment_coordinates(coords, jax.random.key(1), shift=0.1)) - np.asarray(coords)
    assert np.allclose(shifted, shifted[0]) and np.abs(shifted).max() <= 0.1
    # LayerScale 1 so that the attention (where RoPE acts) is not scaled down to 1e-5 of the output.
    model = ViT(**vit_config("S/16", "dinov3", width=64, depth=1, num_heads=4, mlp_dim=128, layerscale_init=1.0))
    images = _images((32, 32))
    params = model.init(jax.random.key(0), images)
    train = [model.apply(params, images, train=True, rngs={"dropout": jax.random.key(s)})[0] for s in (0, 1)]
    evaluate = model.apply(params, images)[0]
    assert not np.allclose(train[0], train[1]) and not np.allclose(train[0], evaluate)


def test_dinov3_family_shapes():
    """ViT-L/16 DINOv3: no position embedding, 4 storage tokens, no key bias; its parameter count
    equals transformers' (304.4M, checked by shape only)."""
    config = vit_config("L/16", "dinov3")
    variables = jax.eval_shape(lambda: ViT(**config).init(jax.random.key(0), np.zeros((1, 64, 64, 3))))
    params = flax.linen.unbox(variables["params"])
    assert "pos_embed" not in params and params["reg_token"].shape == (1, 4, 1024)
    assert "bias" not in params["blocks_0"]["attn"]["key"]
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    hf_config = DINOv3ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096, num_register_tokens=4)
    with torch.device("meta"):
        hf = DINOv3ViTModel(hf_config)
    hf_count = sum(p.numel() for n, p in hf.named_parameters() if "mask_token" not in n)
    assert count == hf_count


def test_mismatched_state_dict_lists_the_names():
    hf = _hf_model()
    sd = {k: v for k, v in hf.state_dict().items() if k != "model.layer.1.mlp.up_proj.weight"}
    sd["layer.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightConversionError, match=r"missing +layer\.1\.mlp\.up_proj\.weight(.|\n)*"
                                                   r"unexpected +layer\.0\.extra\.weight"):
        from_dinov3(sd, hf.config)
    with pytest.raises(WeightConversionError, match="not a DINOv3 ViT state dict"):
        from_dinov3({"pos_embed": np.zeros((1, 5, 8))})


def test_convert_tool_reads_an_official_dinov3_file(tmp_path):
    """jaxseg-convert detects the official layout and writes the params that load into the same ViT."""
    from safetensors.numpy import save_file

    from jaxseg.cli import convert_weights
    from jaxseg.convert.params_io import load_params

    hf = _hf_model()
    official = {k: np.ascontiguousarray(v, np.float32) for k, v in _official_names(hf.state_dict()).items()}
    save_file(official, tmp_path / "dinov3.safetensors")
    assert convert_weights.main(["--input", str(tmp_path / "dinov3.safetensors"), "--num-heads", "4",
                                 "--output", str(tmp_path / "dinov3.msgpack")]) == 0
    config, params = load_params(tmp_path / "dinov3.msgpack")
    images = _images((48, 80))
    assert _errors(config, params, images, _run_hf(hf, images))["final"] < TOL
