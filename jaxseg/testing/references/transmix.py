"""A PyTorch reference of TransMix, written from the official code (Beckschen/TransMix `transmix.py`:
Mixup_transmix._mix_batch's CutMix branch, transmix_label and mixup_target; `train.py`: the loss on the
model's (logits, attention); `timm/models/vision_transformer.py`: the `_return_attn` models' attention, the
last block's softmax before its dropout, detached, the class token's row over the patches averaged over the
heads), with timm's `SoftTargetCrossEntropy`. For WeakTr's class tokens the official label function runs
once per class on that class's label column and its token's attention ("per_class"), or once on the mean
of the tokens' attention ("mean"), as `jaxseg.methods.weaktr.WeakTrMethod.transmix_loss` defines.
Used by tests/test_transmix.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from jaxseg.testing.references.weaktr import torch_cam_loss


def official_cutmix(x: torch.Tensor, box) -> torch.Tensor:
    """_mix_batch's CutMix: the box of the batch flipped pasted into each image (NCHW; on a copy)."""
    yl, yh, xl, xh = box
    x = x.clone()
    x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    return x


def official_transmix_label(y1: torch.Tensor, y2: torch.Tensor, attn: torch.Tensor, box, input_shape):
    """transmix_label: attn (N, hw) of a square grid; y1, y2 (N, K) the labels of the images and of the
    pasted ones; returns the mixed target (N, K). (The official builds the mask on the GPU.)"""
    lam0 = (box[1] - box[0]) * (box[3] - box[2]) / (input_shape[2] * input_shape[3])
    mask = torch.zeros((input_shape[2], input_shape[3]))
    mask[box[0]:box[1], box[2]:box[3]] = 1
    mask = nn.Upsample(size=int(math.sqrt(attn.shape[1])))(mask.unsqueeze(0).unsqueeze(0)).int()
    mask = mask.view(1, -1).repeat(len(attn), 1)
    w1, w2 = torch.sum((1 - mask) * attn, dim=1), torch.sum(mask * attn, dim=1)
    lam1 = w2 / (w1 + w2)
    lam = (lam0 + lam1) / 2
    return y1 * (1. - lam).unsqueeze(1) + y2 * lam.unsqueeze(1)


def _last_attention(model: nn.Module, images: torch.Tensor, forward):
    """(forward(images), the last block's softmax attention (B, heads, T, T), detached)."""
    kept = []
    for block in model.blocks:
        block.attn.fused_attn = False
    hook = model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: kept.append(i[0].detach().clone()))
    try:
        out = forward(images)
    finally:
        hook.remove()
    return out, kept[0]


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def classifier_transmix(model: nn.Module, images: np.ndarray, labels: np.ndarray, box):
    """train.py's TransMix step for a timm ViT classifier (one class token) on NHWC images and one-hot
    labels: (mixed images NCHW, mixed target, loss)."""
    x = official_cutmix(_nchw(images), box)
    logits, attn = _last_attention(model, x, model)
    attn = torch.mean(attn[:, :, 0, 1:], dim=1)
    y1 = torch.from_numpy(labels)
    target = official_transmix_label(y1, y1.flip(0), attn, box, x.shape)
    return x, target, SoftTargetCrossEntropy()(logits, target)


def weaktr_transmix(model: nn.Module, images: np.ndarray, labels: np.ndarray, box, attention: str = "per_class"):
    """The TransMix step of the WeakTr reference (`TorchWeakTr`): (mixed images NCHW, mixed labels, the
    stage-1 loss)."""
    c = model.num_classes
    x = official_cutmix(_nchw(images), box)
    out, attn = _last_attention(model, x, model)
    attn = torch.mean(attn[:, :, :c, c:], dim=1)  # (B, C, P)
    y1 = torch.from_numpy(labels)
    y2 = y1.flip(0)
    if attention == "mean":
        target = official_transmix_label(y1, y2, attn.mean(1), box, x.shape)
    else:
        target = torch.cat([official_transmix_label(y1[:, k:k + 1], y2[:, k:k + 1], attn[:, k], box, x.shape)
                            for k in range(c)], dim=1)
    return x, target, torch_cam_loss(out, target)
