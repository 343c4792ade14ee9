"""PyTorch references of the official Segmenter (rstrudel/segmenter `segm/model/{vit,decoder,segmenter}.py`)
and of WeakTr stage 2 (hustvl/WeakTr `OnlineRetraining/segm/model/{vit,decoder,segmenter}.py`, the same
code plus `MultiMaskTransformer` / `MultiSegmenter` and a DINOv2 encoder with LayerScale): the encoder, the
`DecoderLinear`, `MaskTransformer` and `MultiMaskTransformer` decoders under the official parameter names,
the `Segmenter` / `MultiSegmenter` forward, and the `GradientClipping` loss. Segmenter's blocks are timm's
with torch-default LayerNorm eps. Used by the parity and converter tests and by `benchmarks/bench_weaktr.py`.
"""
import torch
from timm.models.vision_transformer import Block
from torch import nn


def _blocks(width, num_heads, depth, mlp_ratio=4, dropout=0.0, init_values=None):
    return nn.ModuleList([Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                attn_drop=dropout, init_values=init_values, norm_layer=nn.LayerNorm)
                          for _ in range(depth)])


class TorchSegmenterViT(nn.Module):
    """segm/model/vit.py `VisionTransformer` (with `init_values`, WeakTr's `DINOV2VisionTransformer`): a
    class token, a distillation token when `distilled`, a position embedding over both and the
    `image_size` grid, resized bilinearly when the token count differs; classification heads that the
    Segmenter never uses. Attributes shared with timm's ViT (`patch_embed.proj`, `num_prefix_tokens`,
    `forward_features`) let `torch_segmenter` run either."""

    def __init__(self, image_size, patch_size, width, depth, num_heads, distilled=False, init_values=None,
                 n_cls=10):
        super().__init__()
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.num_prefix_tokens = 1 + distilled
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, width))
            self.head_dist = nn.Linear(width, n_cls)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.grid[0] * self.grid[1], width))
        self.blocks = _blocks(width, num_heads, depth, init_values=init_values)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_cls)

    def forward_features(self, im):
        """forward(im, return_features=True): the tokens after the final norm."""
        x = self.patch_embed.proj(im).flatten(2).transpose(1, 2)
        prefix = [self.cls_token] + ([self.dist_token] if self.num_prefix_tokens == 2 else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], 1)
        pos_embed = self.pos_embed
        if x.shape[1] != pos_embed.shape[1]:  # resize_pos_embed
            n = self.num_prefix_tokens
            grid = pos_embed[:, n:].reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
            new_grid = (im.shape[2] // self.patch_embed.proj.kernel_size[0],
                        im.shape[3] // self.patch_embed.proj.kernel_size[1])
            grid = nn.functional.interpolate(grid, size=new_grid, mode="bilinear")
            pos_embed = torch.cat([pos_embed[:, :n], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)
        x = x + pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class TorchDecoderLinear(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x, rows):
        x = self.head(x)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, -1)


class TorchMaskTransformer(nn.Module):
    """MaskTransformer: the read-out after the last block."""

    def __init__(self, num_classes, width, num_heads, depth=2, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.blocks = _blocks(width, num_heads, depth, mlp_ratio, dropout)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, width))
        self.proj_dec = nn.Linear(width, width)
        self.proj_patch = nn.Parameter(torch.randn(width, width) * width ** -0.5)
        self.proj_classes = nn.Parameter(torch.randn(width, width) * width ** -0.5)
        self.decoder_norm = nn.LayerNorm(width)
        self.mask_norm = nn.LayerNorm(num_classes)

    def cls_forward(self, x, rows):
        n = self.num_classes
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, :-n] @ self.proj_patch, x[:, -n:] @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ cls_seg_feat.transpose(1, 2))
        return masks.transpose(1, 2).reshape(masks.shape[0], n, rows, -1)

    def joint_tokens(self, x):
        return torch.cat((self.proj_dec(x), self.cls_emb.expand(x.size(0), -1, -1)), 1)

    def forward(self, x, rows):
        x = self.joint_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.cls_forward(x, rows)


class TorchMultiMaskTransformer(TorchMaskTransformer):
    """WeakTr's MultiMaskTransformer: the read-outs before and after the last block."""

    def forward(self, x, rows):
        x = self.joint_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.cls_forward(x, rows), self.cls_forward(self.blocks[-1](x), rows)


class TorchSegmenter(nn.Module):
    """Segmenter / MultiSegmenter: the `encoder.` and `decoder.` names of the official checkpoints."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, im):
        return torch_segmenter(self.encoder, self.decoder, im)


def randomize(module, seed=0, scale=0.3):
    """Every parameter random (LayerNorm scales around 1, the rest around 0), so that none sits at an
    init value that would hide a mix-up; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_norm_scale = name.endswith("weight") and param.ndim == 1
            param.copy_(torch.randn_like(param) * scale + float(is_norm_scale))
    return module.eval()


def torch_segmenter(encoder, decoder, im):
    """Segmenter.forward / MultiSegmenter.forward: pad bottom/right to the patch size, encode (final norm),
    drop the class (and distillation) token, decode, upsample bilinearly, crop. Returns the decoder's
    read-outs as a tuple (one for DecoderLinear and MaskTransformer, two for MultiMaskTransformer)."""
    patch = encoder.patch_embed.proj.kernel_size[0]
    height, width = im.shape[2:]
    im = nn.functional.pad(im, (0, -width % patch, 0, -height % patch))
    tokens = encoder.forward_features(im)[:, encoder.num_prefix_tokens:]
    masks = decoder(tokens, im.shape[2] // patch)
    masks = masks if isinstance(masks, tuple) else (masks,)
    return tuple(nn.functional.interpolate(m, size=im.shape[2:], mode="bilinear")[:, :, :height, :width]
                 for m in masks)


def torch_gradient_clipping_loss(seg_pred, seg_gt, start_value, patch_size):
    """GradientClipping.forward, with the stage-2 criterion, followed by the mean."""
    ori_loss = torch.nn.CrossEntropyLoss(ignore_index=255, reduction="none")(seg_pred, seg_gt)
    detach_loss = ori_loss.detach().clone()
    mean_loss = detach_loss.mean()
    if mean_loss > start_value:
        return ori_loss.mean()
    b, h, w = detach_loss.shape
    detach_loss = detach_loss.mean(dim=0).unsqueeze(0)
    local_mean = torch.nn.functional.avg_pool2d(detach_loss.unsqueeze(1), kernel_size=patch_size,
                                                stride=patch_size, padding=h % patch_size,
                                                count_include_pad=False).squeeze(1)
    local_mean = torch.maximum(local_mean, mean_loss)
    local_mean = torch.repeat_interleave(local_mean, b, dim=0)
    local_mean = torch.repeat_interleave(local_mean, patch_size, dim=1)
    local_mean = torch.repeat_interleave(local_mean, patch_size, dim=2)
    return (torch.clamp(ori_loss - local_mean, None, 0) + local_mean).mean()
