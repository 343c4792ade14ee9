"""The jaxseg ViT against timm's VisionTransformer: random weights, CPU, float32.

Each case converts a tiny timm model with `jaxseg.convert.from_timm`, runs both on the same images and
compares the final tokens, every block's output and every attention map. Tolerance: 1e-5 relative to
the largest magnitude of the reference (float32 round-off of a few layers is ~1e-6).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.convert import from_timm
from jaxseg.models.vit import ViT
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err, run_timm

TOL = 1e-5
TINY = dict(depth=2, embed_dim=64, num_heads=4)

CASES = {
    # DeiT / classic timm: class token with a position entry, no LayerScale.
    "deit": ("vit_small_patch16_224", dict(TINY, img_size=32, patch_size=8), (32, 32)),
    # DINOv2 without registers: the class entry stays in the posemb, LayerScale, patch 14.
    "dinov2": ("vit_small_patch14_dinov2", dict(TINY, img_size=56), (56, 56)),
    # DINOv2 with registers: no_embed_class, 4 registers, LayerScale, patch 14.
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=56), (56, 56)),
    # Input grid different from the position embedding's: resampled at call time (timm dynamic size).
    "deit_resized": ("vit_small_patch16_224", dict(TINY, img_size=32, patch_size=8, dynamic_img_size=True),
                     (48, 72)),
    "dinov2_reg_resized": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=56, dynamic_img_size=True),
                           (42, 98)),
    # One SwiGLU block (ViT-g's MLP).
    "swiglu": ("vit_giant_patch14_reg4_dinov2", dict(TINY, depth=1, mlp_ratio=4, img_size=28), (28, 28)),
}


def _images(size, batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, *size, 3)).astype(np.float32)


def _convert(torch_model):
    config, params = from_timm(torch_model.state_dict(), num_heads=4)
    return ViT(**config), {"params": params}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_timm(case, record_property):
    name, kwargs, size = CASES[case]
    torch_model = random_timm_vit(name, kwargs)
    model, variables = _convert(torch_model)
    images = _images(size)
    ref_out, ref_blocks, ref_probs = run_timm(torch_model, images)

    apply = jax.jit(lambda v, x: model.apply(v, x, return_attention=True))
    out, inter = apply(variables, images)
    errors = {"final": rel_err(out, ref_out)}
    for i, (block, ref) in enumerate(zip(inter["blocks"], ref_blocks, strict=True)):
        errors[f"block{i}"] = rel_err(block, ref)
    for i, (probs, ref) in enumerate(zip(inter["attn_probs"], ref_probs, strict=True)):
        errors[f"attn{i}"] = rel_err(probs, ref)
    # The fused attention path (no probabilities requested) gives the same tokens.
    fused_out, _ = jax.jit(model.apply)(variables, images)
    errors["final_fused_attention"] = rel_err(fused_out, ref_out)

    record_property("max_rel_err", max(errors.values()))
    print(f"{case}: max relative error {max(errors.values()):.2e}  {errors}")
    assert max(errors.values()) <= TOL, errors


def test_attention_mask_matches_timm():
    torch_model = random_timm_vit("vit_small_patch14_reg4_dinov2", CASES["dinov2_reg"][1])
    model, variables = _convert(torch_model)
    images = _images((56, 56))
    num_tokens = 5 + 16
    mask = np.random.default_rng(2).random((2, num_tokens, num_tokens)) > 0.4
    mask[:, :, 0] = True  # every row keeps one key, as EoMT's masks do
    ref_out, ref_blocks, ref_probs = run_timm(torch_model, images, attn_mask=mask)
    for return_attention in (True, False):
        out, inter = model.apply(variables, images, attention_mask=jnp.asarray(mask),
                                 return_attention=return_attention)
        assert rel_err(out, ref_out) <= TOL
    assert max(rel_err(p, r) for p, r in zip(inter["blocks"], ref_blocks)) <= TOL
    # Masked keys get exactly zero probability.
    probs = np.asarray(model.apply(variables, images, attention_mask=jnp.asarray(mask),
                                   return_attention=True)[1]["attn_probs"][0])
    assert np.all(probs[np.broadcast_to(~mask[:, None], probs.shape)] == 0.0)


def test_extra_tokens_match_manual_timm_injection():
    """Tokens prepended before block k (EoMT's queries) equal running timm's blocks by hand."""
    import torch

    torch_model = random_timm_vit("vit_small_patch14_reg4_dinov2", dict(CASES["dinov2_reg"][1], depth=3))
    model, variables = _convert(torch_model)
    images = _images((56, 56))
    queries = np.random.default_rng(3).standard_normal((1, 3, 64)).astype(np.float32)
    with torch.no_grad():
        x = torch_model.patch_embed(torch.from_numpy(images).permute(0, 3, 1, 2))
        x = torch_model._pos_embed(x)
        for i, block in enumerate(torch_model.blocks):
            if i == 1:
                x = torch.cat([torch.from_numpy(queries).expand(2, -1, -1), x], dim=1)
            x = block(x)
        ref = torch_model.norm(x).numpy()
    out, inter = model.apply(variables, images, extra_tokens={1: jnp.asarray(queries)})
    assert out.shape == (2, 3 + 5 + 16, 64)
    assert inter["blocks"][0].shape == (2, 5 + 16, 64)
    assert rel_err(out, ref) <= TOL


def test_bfloat16_compute_close_to_float32():
    torch_model = random_timm_vit("vit_small_patch16_224", CASES["deit"][1])
    config, params = from_timm(torch_model.state_dict(), num_heads=4)
    images = _images((32, 32))
    ref, _ = ViT(**config).apply({"params": params}, images)
    out, inter = ViT(**dict(config, dtype=jnp.bfloat16)).apply({"params": params}, images,
                                                                return_attention=True)
    assert out.dtype == jnp.bfloat16
    assert inter["attn_probs"][0].dtype == jnp.float32  # softmax stays in float32
    assert rel_err(out.astype(jnp.float32), ref) < 5e-2


def test_remat_and_dropout_paths_run_and_match_in_eval():
    torch_model = random_timm_vit("vit_small_patch16_224", CASES["deit"][1])
    config, params = from_timm(torch_model.state_dict(), num_heads=4)
    images = _images((32, 32))
    ref, _ = ViT(**config).apply({"params": params}, images)
    model = ViT(**dict(config, remat=True, drop_path_rate=0.5, dropout_rate=0.1,
                       attention_dropout_rate=0.1))
    out, _ = model.apply({"params": params}, images)  # eval: no randomness, same numbers
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)

    def loss(p, rng):
        y, _ = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
        return jnp.mean(y ** 2)

    grads_a = jax.jit(jax.grad(loss))(params, jax.random.key(0))
    grads_b = jax.jit(jax.grad(loss))(params, jax.random.key(1))
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads_a))
    # Different dropout rngs give different gradients: the stochastic paths are live in training.
    assert not np.allclose(grads_a["blocks_0"]["mlp"]["fc1"]["kernel"],
                           grads_b["blocks_0"]["mlp"]["fc1"]["kernel"])
