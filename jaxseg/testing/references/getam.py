"""A PyTorch reference of GETAM's gradient-weighted attention maps, written from the official code
(weixuansun/GETAM `models/vision_transformer.py` Attention: `save_attn` and `attn.register_hook` on the
attention after its dropout; `DPT/DPT.py` generate_cam_2; the per-image, per-class backward of
`train_from_init.py`), over timm ViT blocks: a timm `VisionTransformer` classifier or the WeakTr reference
(`jaxseg.testing.references.weaktr.TorchWeakTr`). Used by tests/test_gradient_attention.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def getam_maps(forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, images: np.ndarray,
               class_rows: Sequence[int], num_prefix: int, start_layer: int = 0) -> np.ndarray:
    """GETAM maps (B, C, P) of NHWC `images`: `forward(images NCHW)` returns the class scores (B, C) of
    `model`, whose `blocks` are timm blocks; the map of class c is read from token row `class_rows[c]` over
    the patch columns after `num_prefix`."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []

    def keep(index):
        def hook(_, __, attn):  # the official Attention.forward: save_attn, then register_hook
            saved[index] = {"attn": attn}
            attn.register_hook(lambda grad: saved[index].__setitem__("grad", grad))
        return hook

    for index, block in enumerate(model.blocks):
        block.attn.fused_attn = False  # the explicit softmax path, which has the attention tensor
        hooks.append(block.attn.attn_drop.register_forward_hook(keep(index)))
    try:
        scores = forward(torch.from_numpy(images).permute(0, 3, 1, 2))
        batch, classes = scores.shape
        maps = np.zeros((batch, classes, images.shape[1] * images.shape[2] // _patch(model) ** 2), np.float32)
        for b in range(batch):
            for c in range(classes):
                model.zero_grad()
                scores[b, c].backward(retain_graph=True)
                cam_list = []
                for index in range(len(model.blocks)):  # generate_cam_2 for image b
                    grad, cam = saved[index]["grad"][b], saved[index]["attn"][b].detach()
                    cam = (grad * cam).clamp(min=0).mean(dim=0)
                    cam = cam * grad.clamp(min=0).mean(dim=0)
                    cam_list.append(cam)
                cams = torch.stack(cam_list[start_layer:]).sum(dim=0)
                maps[b, c] = torch.relu(cams[class_rows[c], num_prefix:]).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def _patch(model: torch.nn.Module) -> int:
    proj = model.patch_embed["proj"] if isinstance(model.patch_embed, torch.nn.ModuleDict) else model.patch_embed.proj
    return proj.kernel_size[0]
