"""`from_official_weaktr`: official WeakTr / MCTformer-V2 checkpoints (the layout of
`jaxseg/testing/references/weaktr.py`, saved as the official `main.py` saves them) -> jaxseg WeakTr, through a
file and the CLI, and the errors that name what does not fit. Tolerance 1e-5 relative to the reference
outputs. Also stage 1's initialisation: a timm DeiT with its class token repeated C times, loaded as a WeakTr
config's encoder."""
import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from jaxseg.cli import convert_weights
from jaxseg.convert import WeightConversionError, from_official_weaktr, from_timm, load_state_dict, to_timm
from jaxseg.convert.params_io import load_params
from jaxseg.models.weaktr import WeakTr
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err
from jaxseg.testing.references.weaktr import TINY, random_torch_weaktr
from jaxseg.train.checkpoint import load_init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

IMAGES = np.random.default_rng(3).standard_normal((2, 40, 48, 3)).astype(np.float32)  # 5 x 6 grid


def _errors(torch_model, config, params):
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    out = jax.jit(lambda p, x: WeakTr(**config).apply({"params": p}, x))(params, IMAGES)
    return {k: rel_err(out[k], v.numpy()) for k, v in expected.items()}


def _numpy_sd(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def weaktr():
    return random_torch_weaktr()


def test_saved_checkpoint_round_trip_matches_reference(weaktr, tmp_path):
    """{"model": state_dict, "epoch", "miou"}, as main.py writes checkpoint_best_mIoU.pth, read back without
    unpickling; every size and AAF width is inferred (width 64 is no standard width: the heads come from
    the AAF)."""
    torch.save({"model": weaktr.state_dict(), "epoch": 7, "miou": 66.5}, tmp_path / "checkpoint.pth")
    config, params = from_official_weaktr(load_state_dict(tmp_path / "checkpoint.pth"))
    encoder = config["encoder"]
    assert [config[k] for k in ("num_classes", "fusion", "reduction", "feat_reduction")] == [5, "aaf", 8, 8]
    assert (encoder["width"], encoder["depth"], encoder["num_heads"], encoder["patch_size"]) == (64, 2, 4, 8)
    assert (encoder["num_cls_tokens"], encoder["posemb_grid"], encoder["final_norm"]) == (5, (4, 4), False)
    assert "norm" not in params["encoder"]
    errors = _errors(weaktr, config, params)
    print(errors)
    assert max(errors.values()) <= 1e-5, errors


def test_mctformer_checkpoint_has_no_aaf():
    model = random_torch_weaktr("mctformer")
    assert not any(k.startswith("adaptive_attention_fusion.") for k in model.state_dict())
    config, params = from_official_weaktr(_numpy_sd(model), num_heads=TINY["num_heads"])
    assert (config["fusion"], config["mctformer_layers"]) == ("mctformer", TINY["depth"])
    assert "aaf" not in params
    errors = _errors(model, config, params)
    assert max(errors.values()) <= 1e-5, errors
    with pytest.raises(WeightConversionError, match=r"missing +adaptive_attention_fusion\.attn_head_ffn\.0"):
        from_official_weaktr(_numpy_sd(model), num_heads=TINY["num_heads"], fusion="aaf")
    with pytest.raises(WeightConversionError, match="cannot infer the number of heads"):
        from_official_weaktr(_numpy_sd(model))


@pytest.mark.parametrize("key", ["blocks.1.mlp.fc2.bias", "head.bias",
                                 "adaptive_attention_fusion.attn_feat_ffn.1.weight"])
def test_missing_key_is_named(weaktr, key):
    sd = _numpy_sd(weaktr)
    del sd[key]
    with pytest.raises(WeightConversionError, match=rf"missing +{key.replace('.', '[.]')}"):
        from_official_weaktr(sd)


@pytest.mark.parametrize("key", ["blocks.0.attn.extra", "adaptive_attention_fusion.query", "dist_token"])
def test_extra_key_is_named(weaktr, key):
    sd = dict(_numpy_sd(weaktr), **{key: np.zeros((1, 3), np.float32)})
    with pytest.raises(WeightConversionError, match=rf"unexpected +{key.replace('.', '[.]')}"):
        from_official_weaktr(sd)


def test_inconsistent_sizes_are_named(weaktr):
    sd = _numpy_sd(weaktr)
    with pytest.raises(WeightConversionError, match="5 class tokens.*class count and position embedding"):
        from_official_weaktr(dict(sd, pos_embed=sd["pos_embed"][:, 1:]))
    with pytest.raises(WeightConversionError, match=r"shape +head/kernel: got \(3, 3, 64, 4\)"):
        from_official_weaktr(dict(sd, **{k: sd[k][:4] for k in ("head.weight", "head.bias")}))
    with pytest.raises(WeightConversionError, match="num_heads=8, but the AAF features have 16 channels"):
        from_official_weaktr(sd, num_heads=8)
    aaf = "adaptive_attention_fusion.attn_head_ffn"
    twelve_maps = {f"{aaf}.0.weight": np.zeros((1, 12), np.float32),
                   f"{aaf}.2.weight": np.zeros((12, 1), np.float32)}
    with pytest.raises(WeightConversionError, match="AAF weighs 12 attention maps, but the encoder has 2 layers"):
        from_official_weaktr(dict(sd, **twelve_maps))


def test_convert_cli_detects_the_weaktr_layout(weaktr, tmp_path):
    torch.save({"model": weaktr.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    out = tmp_path / "weaktr.msgpack"
    assert convert_weights.main(["--input", str(tmp_path / "checkpoint.pth"), "--output", str(out)]) == 0
    config, params = load_params(out)
    expected_config, expected = from_official_weaktr(weaktr.state_dict())
    config["encoder"]["posemb_grid"] = tuple(config["encoder"]["posemb_grid"])
    assert config == expected_config
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for key, value in flax.traverse_util.flatten_dict(expected, sep="/").items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)
    assert convert_weights.main(["--input", str(tmp_path / "checkpoint.pth"), "--output",
                                 str(tmp_path / "weaktr_orbax")]) == 2


# A timm DeiT of the runlocal WeakTr configs' encoder size (`config_lib.TINY_ENCODER`), on a 4 x 4 grid.
DEIT_TINY = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=8, img_size=32)


def _voc_cam_runlocal_model() -> dict:
    spec = importlib.util.spec_from_file_location("voc_cam", ROOT / "configs" / "weaktr" / "voc_cam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal").model.to_dict()


def test_deit_initialises_the_class_tokens_of_a_weaktr_config(tmp_path):
    """The CLI repeats DeiT's class token and its position entry C times (MCTformer / WeakTr `main.py`),
    resamples the patch entries as for one token and drops the final norm; the file then loads, through
    the trainer's `load_init_params`, into the encoder of configs/weaktr/voc_cam.py (runlocal)."""
    deit = random_timm_vit("deit_small_patch16_224", DEIT_TINY)
    safetensors.torch.save_file(deit.state_dict(), tmp_path / "deit.safetensors")
    sd = {k: v.numpy() for k, v in deit.state_dict().items()}
    out = tmp_path / "deit_cls20.msgpack"
    assert convert_weights.main(["--input", str(tmp_path / "deit.safetensors"), "--output", str(out),
                                 "--num-heads", "2", "--image-size", "64", "--num-cls-tokens", "20",
                                 "--no-final-norm"]) == 0

    config, params = load_params(out)
    one_config, one = from_timm(sd, num_heads=2, image_size=64)
    assert config == dict(one_config, num_cls_tokens=20, final_norm=False)
    np.testing.assert_array_equal(params["cls_token"], np.repeat(sd["cls_token"], 20, axis=1))
    np.testing.assert_array_equal(params["pos_embed"][:, :20], np.repeat(sd["pos_embed"][:, :1], 20, axis=1))
    np.testing.assert_array_equal(params["pos_embed"][:, 20:], one["pos_embed"][:, 1:])  # 4 x 4 -> 8 x 8
    assert "norm" not in params
    flat, flat_one = (flax.traverse_util.flatten_dict(p, sep="/") for p in (params, one))
    for key in set(flat_one) - {"cls_token", "pos_embed", "norm/scale", "norm/bias"}:
        np.testing.assert_array_equal(flat[key], flat_one[key], err_msg=key)

    model = WeakTr(**_voc_cam_runlocal_model())
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    initial = flax.linen.unbox(model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    encoder = load_init_params(out, jax.eval_shape(lambda: initial["encoder"]))
    outputs = model.apply({"params": dict(initial, encoder=encoder)}, images)
    assert outputs["fused_cam"].shape == (2, 20, 8, 8)
    # Identical class tokens at identical positions stay identical through every block.
    logits = np.asarray(outputs["cls_logits"])
    np.testing.assert_allclose(logits, np.broadcast_to(logits[:, :1], logits.shape), rtol=1e-5, atol=1e-6)


def test_class_tokens_from_a_distilled_or_multi_token_vit_are_refused(tmp_path, capsys):
    distilled = random_timm_vit("deit_small_distilled_patch16_224", DEIT_TINY)
    with pytest.raises(WeightConversionError, match="'dist_token' \\(a distilled DeiT\\)"):
        from_timm(distilled.state_dict(), num_heads=2, num_cls_tokens=20)
    safetensors.torch.save_file(distilled.state_dict(), tmp_path / "distilled.safetensors")
    assert convert_weights.main(["--input", str(tmp_path / "distilled.safetensors"), "--output",
                                 str(tmp_path / "out.msgpack"), "--num-heads", "2",
                                 "--num-cls-tokens", "20"]) == 2
    assert "dist_token" in capsys.readouterr().err and not (tmp_path / "out.msgpack").exists()

    deit = random_timm_vit("deit_small_patch16_224", DEIT_TINY).state_dict()
    config, params = from_timm(deit, num_heads=2, num_cls_tokens=3, final_norm=False)
    three_tokens = to_timm(params, config)
    assert from_timm(three_tokens, num_heads=2, num_cls_tokens=3)[0]["num_cls_tokens"] == 3
    with pytest.raises(WeightConversionError, match=r"3 class token\(s\) to num_cls_tokens=5: only a single"):
        from_timm(three_tokens, num_heads=2, num_cls_tokens=5)
    with pytest.raises(WeightConversionError, match=r"1 class token\(s\) to num_cls_tokens=0"):
        from_timm(deit, num_heads=2, num_cls_tokens=0)
