"""PyTorch references of WeakTr stage 2, written from hustvl/WeakTr `OnlineRetraining/segm/model/
{segmenter,decoder}.py`: the `MultiSegmenter` forward with its `MultiMaskTransformer` decoder on timm
blocks (Segmenter's blocks are timm's with torch-default LayerNorm eps; the encoder is a timm ViT), and
the `GradientClipping` loss. Used by the parity tests and by `benchmarks/bench_weaktr.py`.
"""
import torch
from timm.models.vision_transformer import Block
from torch import nn


class TorchMultiMaskTransformer(nn.Module):
    def __init__(self, num_classes, width, num_heads, depth=2, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                           proj_drop=dropout, attn_drop=dropout, norm_layer=nn.LayerNorm)
                                     for _ in range(depth)])
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

    def forward(self, x, rows):
        x = torch.cat((self.proj_dec(x), self.cls_emb.expand(x.size(0), -1, -1)), 1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.cls_forward(x, rows), self.cls_forward(self.blocks[-1](x), rows)


def torch_multi_segmenter(encoder, decoder, im):
    """MultiSegmenter.forward: pad bottom/right to the patch size, encode (final norm), drop the class
    token, decode, upsample bilinearly, crop. Returns the read-outs after the last two decoder blocks."""
    patch = encoder.patch_embed.patch_size[0]
    height, width = im.shape[2:]
    im = nn.functional.pad(im, (0, -width % patch, 0, -height % patch))
    tokens = encoder.forward_features(im)[:, 1:]
    outs = []
    for masks in decoder(tokens, im.shape[2] // patch):
        masks = nn.functional.interpolate(masks, size=im.shape[2:], mode="bilinear")
        outs.append(masks[:, :, :height, :width])
    return outs


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
