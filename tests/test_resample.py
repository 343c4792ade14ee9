"""Resizing and resampling against PyTorch / timm (float32, relative tolerance 1e-5)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from jaxseg.ops.posemb import resample_patch_kernel, resample_posemb
from jaxseg.ops.resize import interpolation_matrix, resize
from jaxseg.testing.references.timm_vit import rel_err

TOL = 1e-5
RNG = np.random.default_rng(0)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_size,out_size", [((37, 37), (40, 40)), ((40, 40), (10, 10)),
                                              ((16, 12), (5, 31)), ((7, 9), (7, 9)), ((5, 3), (1, 1))])
def test_resize_matches_interpolate(method, antialias, in_size, out_size):
    x = RNG.standard_normal((2, *in_size, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode=method,
                             align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
    assert rel_err(resize(x, out_size, method=method, antialias=antialias), expected) <= TOL


def test_resize_on_other_axes_and_bad_arguments():
    x = RNG.standard_normal((2, 3, 8, 6)).astype(np.float32)  # NCHW
    expected = F.interpolate(torch.from_numpy(x), size=(4, 12), mode="bilinear", align_corners=False)
    assert rel_err(resize(x, (4, 12), axes=(2, 3)), expected.numpy()) <= TOL
    with pytest.raises(ValueError, match="method"):
        resize(x, (4, 4), method="nearest-exact")
    with pytest.raises(ValueError, match="one length per resized axis"):
        resize(x, (4,), axes=(2, 3))
    # Rows of every interpolation matrix sum to one (constants are preserved).
    for aa in (False, True):
        np.testing.assert_allclose(interpolation_matrix(13, 5, "bicubic", aa).sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("old_grid,new_grid,num_prefix", [
    ((37, 37), (40, 40), 0), ((14, 14), (7, 9), 1), ((4, 4), (6, 3), 5), ((8, 8), (8, 8), 1)])
def test_resample_posemb_matches_timm(old_grid, new_grid, num_prefix):
    posemb = RNG.standard_normal((1, num_prefix + old_grid[0] * old_grid[1], 32)).astype(np.float32)
    expected = resample_abs_pos_embed(torch.from_numpy(posemb), new_size=list(new_grid),
                                      old_size=list(old_grid), num_prefix_tokens=num_prefix).numpy()
    assert rel_err(resample_posemb(posemb, old_grid, new_grid, num_prefix), expected) <= TOL


@pytest.mark.parametrize("old,new", [(14, 16), (16, 8), (8, (6, 10))])
def test_resample_patch_kernel_matches_timm(old, new):
    new = (new, new) if isinstance(new, int) else new
    kernel = RNG.standard_normal((old, old, 3, 8)).astype(np.float32)  # (h, w, in, out)
    torch_kernel = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())  # (out, in, h, w)
    expected = resample_patch_embed(torch_kernel, list(new)).numpy().transpose(2, 3, 1, 0)
    assert rel_err(resample_patch_kernel(kernel, new), expected) <= TOL


def test_resampled_patch_kernel_keeps_the_embedding_of_upsampled_patches():
    """FlexiViT's defining property: embedding a 14px patch with the 14px kernel equals embedding
    its bicubic 16px upsampling with the resampled kernel."""
    kernel = RNG.standard_normal((14, 14, 3, 8))
    patch = RNG.standard_normal((14, 14, 3))
    upsampled = np.asarray(resize(patch[None].astype(np.float32), (16, 16), method="bicubic",
                                  antialias=True))[0].astype(np.float64)
    old = np.einsum("hwc,hwcd->d", patch, kernel)
    new = np.einsum("hwc,hwcd->d", upsampled, resample_patch_kernel(kernel, (16, 16)))
    assert rel_err(new, old) <= 1e-5


@pytest.mark.parametrize("new_grid", [(20, 30), (7, 9), (14, 28), (14, 14)])
def test_dino_posemb_resize_matches_interpolate_with_scale_factor(new_grid):
    """DINO / MCTformer / WeakTr `interpolate_pos_encoding`: bicubic with scale factors (n + 0.1) / N, also
    for the stored grid when the input is not square; the stored table itself for a square input."""
    posemb = RNG.standard_normal((1, 3 + 14 * 14, 16)).astype(np.float32)
    patch = torch.from_numpy(posemb[:, 3:]).reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    resized = F.interpolate(patch, scale_factor=((new_grid[0] + 0.1) / 14, (new_grid[1] + 0.1) / 14),
                            mode="bicubic")
    expected = np.concatenate([posemb[:, :3], resized.permute(0, 2, 3, 1).reshape(1, -1, 16).numpy()], 1)
    assert rel_err(resample_posemb(posemb, (14, 14), new_grid, 3, mode="dino", square_input=False),
                   expected) <= TOL
    if new_grid == (14, 14):
        assert resample_posemb(posemb, (14, 14), new_grid, 3, mode="dino") is posemb
    else:
        assert rel_err(resample_posemb(posemb, (14, 14), new_grid, 3, mode="dino"), expected) <= TOL
    with pytest.raises(ValueError, match="posemb resize mode"):
        resample_posemb(posemb, (14, 14), new_grid, 3, mode="nearest")
