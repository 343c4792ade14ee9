"""timm reference models with random weights, and capture of their per-block outputs."""
from __future__ import annotations

import numpy as np
import timm
import torch


def random_timm_vit(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A tiny timm ViT in eval mode whose parameters (LayerScale and norms included) are all random, so
    that no parameter sits at an init value that would hide a mix-up."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.ndim == 1 and
                                                          param.shape[0] == model.embed_dim else 0.0))
    return model


def run_timm(model: torch.nn.Module, images_nhwc: np.ndarray, attn_mask: np.ndarray | None = None):
    """(final tokens, [block outputs], [attention probabilities]) from timm's forward_features."""
    blocks, probs, hooks = [], [], []
    for block in model.blocks:
        block.attn.fused_attn = False  # the explicit path exposes the probabilities
        hooks.append(block.register_forward_hook(lambda m, i, o: blocks.append(o.numpy())))
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.numpy())))
    try:
        with torch.no_grad():
            mask = None if attn_mask is None else torch.from_numpy(attn_mask)[:, None]
            out = model.forward_features(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2),
                                         attn_mask=mask).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return out, blocks, probs


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
