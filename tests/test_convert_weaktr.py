"""`from_official_weaktr`: official WeakTr / MCTformer-V2 checkpoints (the layout of `weaktr_reference.py`,
saved as the official `main.py` saves them) -> jaxseg WeakTr, through a file and the CLI, and the errors
that name what does not fit. Tolerance 1e-5 relative to the reference outputs."""
import pathlib
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from jaxseg.convert import WeightConversionError, from_official_weaktr, load_state_dict
from jaxseg.convert.params_io import load_params
from jaxseg.models.weaktr import WeakTr
from timm_reference import rel_err
from weaktr_reference import TINY, random_torch_weaktr

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import convert_weights  # noqa: E402

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
                                 str(tmp_path / "weaktr_orbax")]) == 1
