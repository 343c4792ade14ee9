"""Weight conversion: file formats, layout round trips, geometry changes against timm's own loader,
and the loud diff on bad state dicts."""
import argparse
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from jaxseg.convert import WeightConversionError, from_timm, load_state_dict, to_timm
from jaxseg.convert.params_io import load_params, save_params
from jaxseg.models.vit import ViT
from jaxseg.testing.limits import hang_guard
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err, run_timm

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
TINY = dict(depth=2, embed_dim=64, num_heads=4)
DEIT = ("vit_small_patch16_224", dict(TINY, img_size=32, patch_size=8))
DINO = ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=56))
SWIGLU = ("vit_giant_patch14_reg4_dinov2", dict(TINY, depth=1, mlp_ratio=4, img_size=28))


def _images(size, seed=1):
    return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def _run(config, params, images):
    return np.asarray(ViT(**config).apply({"params": params}, images)[0])


def _numpy_sd(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _flat(tree):
    return flax.traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("name,kwargs", [DEIT, DINO, SWIGLU])
def test_to_timm_inverts_from_timm(name, kwargs):
    sd = _numpy_sd(random_timm_vit(name, kwargs))
    config, params = from_timm(sd, num_heads=4)
    back = {k: np.asarray(v) for k, v in to_timm(params, config).items()}
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_reads_safetensors_and_weights_only_pth(tmp_path):
    model = random_timm_vit(*DINO)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    expected = _numpy_sd(model)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        loaded = load_state_dict(path)
        assert sorted(loaded) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(loaded[key], expected[key])
    # bfloat16 checkpoints load as float32.
    safetensors.torch.save_file({k: v.bfloat16() for k, v in model.state_dict().items()},
                                tmp_path / "bf16.safetensors")
    loaded = load_state_dict(tmp_path / "bf16.safetensors")
    assert loaded["pos_embed"].dtype == np.float32
    assert rel_err(loaded["pos_embed"], expected["pos_embed"]) < 1e-2


def test_pth_with_pickled_objects_is_refused(tmp_path):
    torch.save({"model": random_timm_vit(*DEIT).state_dict(), "args": argparse.Namespace(lr=1.0)},
               tmp_path / "train_ckpt.pth")
    with pytest.raises(WeightConversionError, match="weights_only=True"):
        load_state_dict(tmp_path / "train_ckpt.pth")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file"):
        load_state_dict(tmp_path / "w.ckpt")


@pytest.mark.parametrize("name,kwargs,target_kwargs,overrides", [
    # DINOv2 patch 14 -> EoMT's patch 16 at 64 px, and a larger grid.
    (*DINO, dict(img_size=64, patch_size=16), dict(patch_size=16, image_size=64)),
    # DeiT at another resolution.
    (*DEIT, dict(img_size=48, patch_size=8), dict(image_size=48)),
    # Patch 8 -> 12 (downsampled grid) with a non-square image.
    (*DEIT, dict(img_size=(36, 60), patch_size=12), dict(patch_size=12, image_size=(36, 60))),
])
def test_geometry_changes_match_timm_checkpoint_filter(name, kwargs, target_kwargs, overrides):
    """Converting with a new patch size / image size equals timm's own loading path
    (`checkpoint_filter_fn`: resample_patch_embed + resample_abs_pos_embed) into a timm model built
    at the new geometry."""
    source = random_timm_vit(name, kwargs)
    target = random_timm_vit(name, dict(kwargs, **target_kwargs))
    target.load_state_dict(checkpoint_filter_fn(source.state_dict(), target))
    config, params = from_timm(source.state_dict(), num_heads=4, **overrides)
    size = target_kwargs["img_size"]
    size = (size, size) if isinstance(size, int) else size
    images = _images(size)
    ref, _, _ = run_timm(target, images)
    assert rel_err(_run(config, params, images), ref) <= TOL


def test_original_dinov2_layout_matches_timm_conversion():
    """The DINOv2 release layout (register_tokens, mask_token, class entry in pos_embed, SwiGLU as
    w12/w3) converts like timm's `_convert_dinov2`."""
    model = random_timm_vit(*SWIGLU)
    sd = model.state_dict()
    class_entry = torch.randn(1, 1, 64)
    original = {("register_tokens" if k == "reg_token" else k)
                .replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v.clone()
                for k, v in sd.items()}
    original["cls_token"] = sd["cls_token"] - class_entry
    original["pos_embed"] = torch.cat([class_entry, sd["pos_embed"]], dim=1)
    original["mask_token"] = torch.zeros(1, 64)
    timm_converted = checkpoint_filter_fn(dict(original), model)
    config, params = from_timm(original, num_heads=4)
    expected_config, expected = from_timm(timm_converted, num_heads=4)
    assert config == expected_config
    for key, value in _flat(expected).items():
        np.testing.assert_allclose(_flat(params)[key], value, rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name,kwargs,covers", [(*DEIT, False), (*DINO, True)])
def test_moving_prefix_position_entries_keeps_outputs(name, kwargs, covers):
    """Folding the class entry of the position embedding into the class token (what EoMT does for
    DeiT-style weights), or giving a DINOv2 embedding zero prefix entries, changes no output."""
    sd = random_timm_vit(name, kwargs).state_dict()
    config, params = from_timm(sd, num_heads=4)
    moved_config, moved = from_timm(sd, num_heads=4, posemb_covers_prefix=covers)
    assert moved_config["posemb_covers_prefix"] is covers
    assert moved["pos_embed"].shape[1] != params["pos_embed"].shape[1]
    images = _images((kwargs["img_size"],) * 2)
    assert rel_err(_run(moved_config, moved, images), _run(config, params, images)) <= TOL


def test_misshaped_or_missing_keys_give_a_diff():
    sd = _numpy_sd(random_timm_vit(*DINO))
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:-1]
    bad["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightConversionError) as info:
        from_timm(bad, num_heads=4)
    message = str(info.value)
    assert "- missing     blocks.1.ls2.gamma (64,)" in message
    assert "~ shape       blocks.0.attn.qkv.weight: got (191, 64), expected (192, 64)" in message
    assert "+ unexpected  blocks.0.attn.extra.weight (3,)" in message


def test_bad_options_are_named():
    sd = _numpy_sd(random_timm_vit(*DINO))
    with pytest.raises(WeightConversionError, match="cannot infer the number of heads for width 64"):
        from_timm(sd)
    with pytest.raises(ValueError, match="unknown from_timm option.*'widht'"):
        from_timm(sd, num_heads=4, widht=64)
    with pytest.raises(WeightConversionError, match="fixes num_registers=4"):
        from_timm(sd, num_heads=4, num_registers=0)
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        from_timm(sd, num_heads=4, patch_size=16, image_size=56)
    with pytest.raises(WeightConversionError, match="not a timm ViT state dict"):
        from_timm({"weight": np.zeros(3)}, num_heads=4)


@pytest.mark.parametrize("suffix", [".msgpack", "_orbax"])
def test_convert_cli_writes_loadable_params_and_never_overwrites(tmp_path, suffix):
    model = random_timm_vit(*DINO)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / f"converted{suffix}"
    cmd = [sys.executable, str(ROOT / "tools" / "convert_weights.py"), "--input",
           str(tmp_path / "w.safetensors"), "--output", str(out), "--num-heads", "4",
           "--patch-size", "16", "--image-size", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=hang_guard(300))
    assert proc.returncode == 0, proc.stderr
    config, params = load_params(out)
    expected_config, expected = from_timm(model.state_dict(), num_heads=4, patch_size=16, image_size=64)
    assert config == expected_config
    for key, value in _flat(expected).items():
        np.testing.assert_array_equal(np.asarray(_flat(params)[key]), value, err_msg=key)

    before = sorted(p.name for p in tmp_path.iterdir())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=hang_guard(300))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    replaced = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=hang_guard(300))
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging leftovers


def test_params_io_rejects_foreign_files(tmp_path):
    (tmp_path / "x.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="not a jaxseg msgpack params file"):
        load_params(tmp_path / "x.msgpack")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="not a jaxseg orbax params directory"):
        load_params(tmp_path / "d")
    config, params = from_timm(random_timm_vit(*DEIT).state_dict(), num_heads=4)
    save_params(tmp_path / "p.msgpack", config, params)
    with pytest.raises(FileExistsError):
        save_params(tmp_path / "p.msgpack", config, params)
    loaded_config, loaded = load_params(tmp_path / "p.msgpack")
    assert loaded_config == config
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
