"""A PyTorch reference of Prompt-CAM, written from the official code (Imageomics/Prompt_CAM `model/vpt.py`
VPT, `model/vision_transformer.py` VisionTransformerPETL.forward_features / forward_head,
`model/attention.py` AttentionPETL, `engine/trainer.py`'s loss) over a timm `VisionTransformer`, whose
blocks compute what the official `BlockPETL` / `AttentionPETL` compute (q scaled before q k^T, softmax,
no fused kernel). Parameter names are the official ones (`vpt.prompt_embeddings` (layers, C, D), `head`
Linear(D, 1)); the backbone is the timm model's.

VPT-deep follows the official `train_type: prompt_cam` loop (prompts of layer i prepended before block i,
the outputs of the first C tokens cut after every block, the last block's kept). VPT-shallow has no working
official form for Prompt-CAM (with `vpt_mode: shallow` the official loop drops the prompts after the first
block and then cuts C patch tokens per block); here it is the VPT paper's shallow variant: prompts before
the first block, kept through all blocks. Used by tests/test_prompt_cam.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class TorchPromptCAM(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, vpt: str = "deep", prompt_dropout: float = 0.0):
        super().__init__()
        self.vit, self.num_classes, self.mode = vit, num_classes, vpt
        width, depth = vit.embed_dim, len(vit.blocks)
        patch = vit.patch_embed.proj.kernel_size[0]
        self.vpt = nn.Module()
        self.vpt.prompt_embeddings = nn.Parameter(torch.zeros(depth if vpt == "deep" else 1, num_classes, width))
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))  # xavier_uniform, as VPT
        nn.init.uniform_(self.vpt.prompt_embeddings.data, -bound, bound)
        self.vpt.prompt_dropout = nn.Dropout(prompt_dropout)
        self.head = nn.Linear(width, 1)

    def retrieve_prompt(self, index: int, batch: int):
        prompts = self.vpt.prompt_embeddings
        if index >= len(prompts):
            return None
        return self.vpt.prompt_dropout(prompts[index]).expand(batch, -1, -1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCHW normalised images -> (logits (B, C), trait maps (B, C, heads, h, w): the last block's
        attention of each class prompt over the patches)."""
        vit, c = self.vit, self.num_classes
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        probs = []
        last = vit.blocks[-1]
        last.attn.fused_attn = False  # the explicit path exposes the probabilities
        hook = last.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
        try:
            for index, block in enumerate(vit.blocks):
                prompt = self.retrieve_prompt(index, x.shape[0])
                if prompt is not None:
                    x = torch.cat([prompt, x], dim=1)
                x = block(x)
                if self.mode == "deep":
                    outputs = x
                    x = x[:, c:, :]
            if self.mode == "deep":
                x = outputs
        finally:
            hook.remove()
        x = vit.norm(x)
        logits = self.head(x[:, :c]).squeeze(-1)
        patch = vit.patch_embed.proj.kernel_size[0]
        rows, cols = images.shape[2] // patch, images.shape[3] // patch
        attn = probs[-1][:, :, :c, c + vit.num_prefix_tokens:]
        traits = attn.permute(0, 2, 1, 3).reshape(attn.shape[0], c, attn.shape[1], rows, cols)
        return logits, traits


def torch_prompt_cam(vit: nn.Module, num_classes: int, vpt: str = "deep", seed: int = 0) -> TorchPromptCAM:
    """A reference over `vit` (frozen, as the official `get_model`: only `vpt` and `head` require grad)
    whose prompts and head are random (the head drawn at N(0, 0.3^2), so no value sits at an init value)."""
    torch.manual_seed(seed)
    model = TorchPromptCAM(vit, num_classes, vpt).eval()
    with torch.no_grad():
        for param in model.head.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    for name, param in model.named_parameters():
        param.requires_grad = any(m in name for m in ("vpt", "head"))
    return model


def to_jaxseg(model: TorchPromptCAM) -> dict:
    """The prompts and head as jaxseg params (the encoder comes from `jaxseg.convert.from_timm`)."""
    weight = model.head.weight.detach().numpy()
    return {"prompts": model.vpt.prompt_embeddings.detach().numpy().astype(np.float32),
            "head": {"kernel": weight.T.copy(), "bias": model.head.bias.detach().numpy().copy()}}
