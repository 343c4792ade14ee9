"""Point sampling against torch's `grid_sample` and transformers' Mask2Former point selection.

`point_sample` must match `F.grid_sample(align_corners=False, padding_mode="zeros")` to float32
rounding (relative tolerance 1e-5), values and gradients; the importance-sampled points must equal
transformers' exactly when both sides get the same uniform draws.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from jaxseg.ops.point_sample import (
    importance_point_counts,
    importance_sample_points,
    point_sample,
    select_uncertain_points,
)
from jaxseg.testing.references.timm_vit import rel_err

TOL = 1e-5
RNG = np.random.default_rng(0)


def torch_point_sample(maps: np.ndarray, coords: np.ndarray, grad_of=None):
    """detectron2's point_sample on (N, H, W) maps and (N, P, 2) coords; optionally the gradient of
    sum(out * grad_of) with respect to the maps."""
    maps_t = torch.tensor(np.asarray(maps))[:, None].requires_grad_(grad_of is not None)
    grid = 2.0 * torch.tensor(np.asarray(coords))[:, :, None] - 1.0
    out = F.grid_sample(maps_t, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[:, 0, :, 0]
    if grad_of is None:
        return out.detach().numpy()
    (out * torch.from_numpy(grad_of)).sum().backward()
    return out.detach().numpy(), maps_t.grad[:, 0].numpy()


def test_point_counts_follow_mask2former():
    assert importance_point_counts(12544) == (37632, 9408)  # EoMT / Mask2Former defaults
    assert importance_point_counts(10, 2.5, 0.33) == (25, 3)  # int() truncation, not rounding
    with pytest.raises(ValueError, match="oversample_ratio"):
        importance_point_counts(10, 0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        importance_point_counts(10, 3.0, 1.5)


def random_coords(n: int, p: int, size: tuple) -> np.ndarray:
    """Uniform points over [-0.2, 1.2]^2 plus points exactly at the image border, at the outermost
    pixel centres and at the half-pixel just outside them (all four neighbours partly outside)."""
    h, w = size
    special = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0.5 / w, 0.5 / h], [1 - 0.5 / w, 1 - 0.5 / h],
                        [-0.5 / w, 0.5], [0.5, 1 + 0.5 / h], [-1 / w, -1 / h], [1 + 1 / w, 0.3]])
    uniform = RNG.uniform(-0.2, 1.2, (n, p - len(special), 2))
    return np.concatenate([np.broadcast_to(special, (n, *special.shape)), uniform], 1).astype(np.float32)


@pytest.mark.parametrize("size", [(7, 9), (16, 12), (1, 1), (2, 5)])
def test_point_sample_matches_grid_sample(size):
    maps = RNG.standard_normal((3, *size)).astype(np.float32)
    coords = random_coords(3, 200, size)
    expected = torch_point_sample(maps, coords)
    assert rel_err(point_sample(maps, coords), expected) <= TOL


def test_resolution_mismatch_samples_the_same_physical_points():
    """Stride-4 logits and full-resolution targets: both sampled at the same normalised points must
    match grid_sample, and a linear ramp (exact under bilinear interpolation between pixel centres)
    must read the same value at both resolutions."""
    coords = RNG.uniform(0.07, 0.93, (2, 300, 2)).astype(np.float32)  # inside the outermost centres
    for h, w in [(8, 10), (32, 40), (31, 41)]:
        maps = RNG.standard_normal((2, h, w)).astype(np.float32)
        assert rel_err(point_sample(maps, coords), torch_point_sample(maps, coords)) <= TOL
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w  # pixel centres, normalised
        ramp = np.broadcast_to(2 * xs[None, :] - 3 * ys[:, None], (2, h, w)).astype(np.float32)
        expected = 2 * coords[..., 0] - 3 * coords[..., 1]
        np.testing.assert_allclose(point_sample(ramp, coords), expected, atol=2e-6)


def test_shared_coords_broadcast_over_maps():
    maps = RNG.standard_normal((2, 5, 6, 7)).astype(np.float32)  # (B, Q, H, W)
    coords = RNG.uniform(size=(2, 1, 40, 2)).astype(np.float32)  # one point set per image
    out = point_sample(maps, coords)
    assert out.shape == (2, 5, 40)
    for b in range(2):
        expected = torch_point_sample(maps[b], np.repeat(coords[b], 5, axis=0))
        assert rel_err(out[b], expected) <= TOL


def test_gradients_flow_to_maps_not_coords():
    maps = RNG.standard_normal((3, 9, 6)).astype(np.float32)
    coords = random_coords(3, 120, (9, 6))
    cotangent = RNG.standard_normal((3, 120)).astype(np.float32)
    _, expected = torch_point_sample(maps, coords, grad_of=cotangent)

    def loss(m, c):
        return jnp.sum(point_sample(m, c) * cotangent)

    grad_maps, grad_coords = jax.jit(jax.grad(loss, argnums=(0, 1)))(maps, coords)
    assert rel_err(grad_maps, expected) <= TOL
    assert not np.any(grad_coords)


def test_dtypes_and_bad_inputs():
    maps = RNG.standard_normal((2, 8, 8)).astype(np.float32)
    coords = RNG.uniform(size=(2, 30, 2)).astype(np.float32)
    out16 = point_sample(jnp.asarray(maps, jnp.bfloat16), coords)
    assert out16.dtype == jnp.bfloat16
    reference = point_sample(jnp.asarray(maps, jnp.bfloat16).astype(jnp.float32), coords)
    np.testing.assert_allclose(np.float32(out16), reference, rtol=2 ** -8, atol=1e-6)  # one rounding
    with pytest.raises(TypeError, match="floating"):
        point_sample(maps > 0, coords)
    with pytest.raises(ValueError, match=r"\(\.\.\., P, 2\)"):
        point_sample(maps, coords[..., :1])
    with pytest.raises(ValueError, match="broadcast"):
        point_sample(maps, coords[:1].repeat(3, 0))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        select_uncertain_points(maps[0], coords, coords, 5)


def transformers_importance_points(monkeypatch, logits, draws, num_points, oversample, importance):
    """transformers' sample_points_using_uncertainty with torch.rand replaced by the given draws."""
    pending = [torch.from_numpy(d) for d in draws]

    def fake_rand(*shape, device=None):
        draw = pending.pop(0)
        assert tuple(draw.shape) == tuple(shape), (draw.shape, shape)
        return draw

    monkeypatch.setattr(torch, "rand", fake_rand)

    def uncertainty(x):
        return Mask2FormerLoss.calculate_uncertainty(None, x)

    # The method uses nothing from `self`, so it is called unbound instead of building a config.
    with torch.no_grad():
        out = Mask2FormerLoss.sample_points_using_uncertainty(
            None, torch.from_numpy(logits)[:, None], uncertainty, num_points, oversample, importance)
    assert not pending
    return out.numpy()


@pytest.mark.parametrize("num_points,oversample,importance,size", [
    (50, 3.0, 0.75, (12, 10)), (1000, 3.0, 0.75, (40, 40)), (64, 2.5, 0.5, (5, 17)),
    (30, 1.0, 1.0, (8, 8)), (30, 3.0, 0.0, (8, 8))])
def test_importance_points_match_transformers(monkeypatch, num_points, oversample, importance, size):
    n = 4
    logits = (RNG.standard_normal((n, *size)) * 3).astype(np.float32)
    num_candidates, num_uncertain = importance_point_counts(num_points, oversample, importance)
    candidates = RNG.uniform(size=(n, num_candidates, 2)).astype(np.float32)
    fresh = RNG.uniform(size=(n, num_points - num_uncertain, 2)).astype(np.float32)
    draws = [candidates] + ([fresh] if fresh.shape[1] else [])
    expected = transformers_importance_points(monkeypatch, logits, draws, num_points, oversample,
                                              importance)
    got = np.asarray(jax.jit(select_uncertain_points, static_argnums=3)(logits, candidates, fresh,
                                                                        num_uncertain))
    assert got.shape == expected.shape == (n, num_points, 2)
    # Both sides hold the same float32 draws, so the selected coordinates agree bit for bit. The
    # sampled logits differ in the last bits (XLA fuses multiply-adds, PyTorch does not), which may
    # swap the rank of two near-equal uncertainties: the kept sets are compared exactly, the order up
    # to such swaps.
    np.testing.assert_array_equal(got[:, num_uncertain:], expected[:, num_uncertain:])
    for g, e, lg in zip(got[:, :num_uncertain], expected[:, :num_uncertain], logits):
        np.testing.assert_array_equal(g[np.lexsort(g.T)], e[np.lexsort(e.T)])
        uncertainty = -np.abs(torch_point_sample(lg[None], g[None])[0])
        assert np.all(np.diff(uncertainty) <= 1e-5 * np.abs(lg).max())  # most uncertain first


def test_importance_sample_points_with_key():
    """The key-based wrapper: static shapes, [0, 1) points, determinism, no gradient to the logits,
    and the importance part concentrated where the logit crosses zero."""
    h, w = 24, 32
    ramp = np.broadcast_to((np.arange(w) + 0.5) / w - 0.5, (h, w))  # logit = x - 0.5
    logits = jnp.asarray(np.stack([ramp, -ramp]), jnp.float32)
    sample = jax.jit(importance_sample_points, static_argnums=(2, 3, 4))
    key = jax.random.key(3)
    coords = sample(key, logits, 400, 3.0, 0.75)
    assert coords.shape == (2, 400, 2) and coords.dtype == jnp.float32
    assert np.all((coords >= 0) & (coords < 1))
    np.testing.assert_array_equal(coords, sample(key, logits, 400, 3.0, 0.75))
    assert not np.array_equal(coords, sample(jax.random.key(4), logits, 400, 3.0, 0.75))
    # 300 of 1200 uniform candidates are kept: the quarter with the smallest |logit|, about |x - 0.5|
    # < 0.125 (less where zero padding pulls logits near the border towards 0); fresh points are uniform.
    magnitude = np.abs(point_sample(logits, coords))
    assert magnitude[:, :300].max() < 0.14 and magnitude[:, 300:].max() > 0.3
    jacobian = jax.jacobian(lambda x: importance_sample_points(key, x, 20))(logits)
    assert not np.any(jacobian)
