"""ViT variants (shape-only, against timm's definitions), bad inputs, and the torch-free runtime."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from jaxseg.convert.timm import abstract_params, to_timm
from jaxseg.models.vit import ViT, vit_config
from jaxseg.testing.limits import hang_guard

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant,family,timm_name,timm_kwargs", [
    ("S/16", "deit", "deit_small_patch16_224", {}),
    ("B/16", "deit", "deit_base_patch16_224", {}),
    ("L/16", "deit", "vit_large_patch16_224", {}),
    ("S/14", "dinov2", "vit_small_patch14_dinov2", {}),
    ("S/14", "dinov2_reg", "vit_small_patch14_reg4_dinov2", {}),
    ("B/14", "dinov2_reg", "vit_base_patch14_reg4_dinov2", {}),
    ("L/14", "dinov2_reg", "vit_large_patch14_reg4_dinov2", {}),
    ("g/14", "dinov2_reg", "vit_giant_patch14_reg4_dinov2", {}),
    # EoMT's backbone: DINOv2-L with registers at patch 16, 640 px.
    ("L/16", "dinov2_reg", "vit_large_patch14_reg4_dinov2", dict(patch_size=16, img_size=640)),
])
def test_variants_have_timm_names_and_shapes(variant, family, timm_name, timm_kwargs):
    overrides = {}
    if "img_size" in timm_kwargs:
        grid = timm_kwargs["img_size"] // timm_kwargs["patch_size"]
        overrides["posemb_grid"] = (grid, grid)
    config = vit_config(variant, family, **overrides)
    ours = jax.eval_shape(lambda p: to_timm(p, config), abstract_params(config))
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_vit_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="variant must look like 'S/16'"):
        vit_config("XL/16")
    with pytest.raises(ValueError, match="family must be one of"):
        vit_config("S/16", "dino3")
    with pytest.raises(ValueError, match="unknown ViT option.*'widht'"):
        vit_config("S/16", widht=3)


@pytest.fixture(scope="module")
def tiny():
    model = ViT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(2, 2))
    return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize("shape,message", [
    ((1, 20, 16, 3), "image size 20x16 is not divisible by the patch size 8"),
    ((1, 16, 16, 4), "images have 4 channels, the ViT expects 3"),
    ((1, 3, 16, 16), "images have 16 channels"),
    ((16, 16, 3), "images must be \\(batch, height, width, channels\\)"),
])
def test_bad_images_are_named(tiny, shape, message):
    model, variables = tiny
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape))


def test_bad_extra_tokens_and_masks_are_named(tiny):
    model, variables = tiny
    images = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match=r"extra_tokens block indices \[2\] are outside 0..1"):
        model.apply(variables, images, extra_tokens={2: jnp.zeros((1, 1, 32))})
    with pytest.raises(ValueError, match=r"extra_tokens\[0\] must be \(batch or 1, n, 32\)"):
        model.apply(variables, images, extra_tokens={0: jnp.zeros((1, 32))})
    with pytest.raises(ValueError, match=r"attention mask must have shape \(batch, tokens, tokens\) = "
                                         r"\(2, 5, 5\)"):
        model.apply(variables, images, attention_mask=jnp.ones((2, 4, 4), bool))
    with pytest.raises(ValueError, match="width 32 is not divisible by num_heads 3"):
        ViT(width=32, depth=1, num_heads=3, mlp_dim=64, patch_size=8, posemb_grid=(2, 2)).init(
            jax.random.key(0), images)


def test_runtime_needs_no_torch(tmp_path):
    """The library (ViT, resampling, conversion from numpy / safetensors, params files) works with
    torch made unimportable."""
    script = f"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import numpy as np, jax, jax.numpy as jnp
from safetensors.numpy import save_file
import jaxseg.convert, jaxseg.convert.params_io, jaxseg.models.vit, jaxseg.ops.posemb, jaxseg.parallel
from jaxseg.convert.timm import abstract_params, to_timm
config = jaxseg.models.vit.vit_config("S/14", "dinov2_reg", depth=1, posemb_grid=(2, 2))
shapes = jax.eval_shape(lambda p: to_timm(p, config), abstract_params(config))
rng = np.random.default_rng(0)
save_file({{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shapes.items()}},
          "{tmp_path}/w.safetensors")
sd = jaxseg.convert.load_state_dict("{tmp_path}/w.safetensors")
cfg, params = jaxseg.convert.from_timm(sd, patch_size=16, image_size=32)
jaxseg.convert.params_io.save_params("{tmp_path}/p.msgpack", cfg, params)
cfg, params = jaxseg.convert.params_io.load_params("{tmp_path}/p.msgpack")
out, _ = jaxseg.models.vit.ViT(**cfg).apply({{"params": params}}, jnp.zeros((1, 48, 32, 3)))
assert out.shape == (1, 5 + 6, 384), out.shape
open("{tmp_path}/w.pth", "wb").close()
try:
    jaxseg.convert.load_state_dict("{tmp_path}/w.pth")
    raise SystemExit("reading a .pth file without torch must raise ImportError")
except ImportError as e:
    assert "needs PyTorch" in str(e), e
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=hang_guard(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_a_parent_module_can_drive_embed_blocks_and_norm(tiny):
    """EoMT and WeakTr run the ViT piece by piece from their own modules (masks built between blocks);
    the pieces compose to exactly the ViT's own forward pass, with the ViT's parameter names."""
    import flax.linen as nn

    class Wrapper(nn.Module):
        @nn.compact
        def __call__(self, images):
            vit = ViT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(2, 2),
                      name="encoder")
            x = vit.embed(images)
            for block in vit.blocks:
                x, _ = block(x)
            return vit.norm(x)

    model, variables = tiny
    images = jax.random.normal(jax.random.key(1), (2, 24, 16, 3))
    wrapped = {"params": {"encoder": variables["params"]}}
    assert jax.tree_util.tree_structure(Wrapper().init(jax.random.key(0), images)) == \
        jax.tree_util.tree_structure(wrapped)
    np.testing.assert_array_equal(Wrapper().apply(wrapped, images), model.apply(variables, images)[0])


def test_block_attention_probs_recomputes_the_forward_maps(tiny):
    model, variables = tiny
    images = jax.random.normal(jax.random.key(2), (2, 16, 24, 3))
    _, out = model.apply(variables, images, return_attention=True)
    inputs = [out["embedded"]] + out["blocks"][:-1]
    for i, x in enumerate(inputs):
        probs = model.apply(variables, x, method=lambda m, x, i=i: m.blocks[i].attention_probs(x))
        np.testing.assert_array_equal(probs, out["attn_probs"][i])
    assert set(out) == {"embedded", "blocks", "attn_probs", "attn_out"}
