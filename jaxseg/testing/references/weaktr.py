"""A PyTorch reference of WeakTr stage 1, written from the official code (hustvl/WeakTr `models.py`
WeakTr.forward / interpolate_pos_encoding and `AAF.py`, V3) on timm's ViT blocks, as WeakTr's own
`vision_transformer.py` is. Parameter names are the official checkpoint's (`patch_embed.proj`,
`cls_token` (1, C, D), `pos_embed` (1, C + P, D), `blocks.i`, `norm`, `head`,
`adaptive_attention_fusion.attn_{feat,head}_ffn`), so its state dict stands in for a released checkpoint.
With fusion "mctformer" it is MCTformer-V2 (no AAF module). `official_image_cams` is the official CAM
inference of one image (`datasets.py` VOC12DatasetMS and `engine.py` generate_attention_maps_ms, in
float32). Used by the parity and converter tests and by `benchmarks/bench_weaktr.py`.
"""
from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import torch
from timm.models.vision_transformer import Block
from torch import nn

from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD

# The size the tests use: 5 classes, width 64, 2 layers of 4 heads, patch 8, 4 x 4 pretraining grid.
TINY = dict(num_classes=5, width=64, depth=2, num_heads=4, patch_size=8, grid=4)


class TorchAAF(nn.Module):
    """AAF.py's AAF with `pool="max"`: token pooling, a per-map 2-layer FFN without activation, a head FFN
    with sigmoid."""

    def __init__(self, channel, reduction, feats_channel, feat_reduction):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.attn_head_ffn = nn.Sequential(nn.Linear(channel, channel // reduction, bias=False), nn.ReLU(),
                                           nn.Linear(channel // reduction, channel, bias=False), nn.Sigmoid())
        self.attn_feat_ffn = nn.Sequential(nn.Linear(feats_channel, feats_channel // feat_reduction),
                                           nn.Linear(feats_channel // feat_reduction, 1))

    def forward(self, attn_feat, x):
        b, c, n, m = attn_feat.shape  # (B, L maps, T tokens, d channels)
        pooled = self.pool(attn_feat.permute(0, 1, 3, 2).contiguous().view(b, c * m, n, 1))
        weight = self.attn_feat_ffn(pooled.view(b * c, m)).view(b, c)
        weight = self.attn_head_ffn(weight).view(b, c, 1, 1)
        return x * weight, x * weight


class TorchWeakTr(nn.Module):
    def __init__(self, num_classes, width, depth, num_heads, patch_size, grid, *, fusion="aaf",
                 mctformer_layers=None, reduction=8, feat_reduction=8, mlp_ratio=4, drop_path_rate=0.0):
        super().__init__()
        self.num_classes, self.width, self.patch_size = num_classes, width, patch_size
        self.fusion, self.mctformer_layers = fusion, mctformer_layers or depth
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, width, patch_size, patch_size)})
        self.cls_token = nn.Parameter(torch.randn(1, num_classes, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_classes + grid ** 2, width) * 0.02)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate,
                                           norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                     for rate in rates])
        # Part of the official checkpoints (WeakTr subclasses DeiT's VisionTransformer), never applied.
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Conv2d(width, num_classes, 3, padding=1)
        if fusion == "aaf":
            self.adaptive_attention_fusion = TorchAAF(depth * num_heads, reduction, width // num_heads,
                                                      feat_reduction)

    def interpolate_pos_encoding(self, rows, cols, height, width):
        c, d = self.num_classes, self.width
        n = self.pos_embed.shape[1] - c
        side = int(n ** 0.5)
        if rows * cols == n and height == width:  # pixel sizes: a non-square input is always resampled
            return self.pos_embed
        patch = self.pos_embed[:, c:].reshape(1, side, side, d).permute(0, 3, 1, 2)
        patch = nn.functional.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                                          mode="bicubic")
        return torch.cat([self.pos_embed[:, :c], patch.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)

    def forward(self, x):
        c = self.num_classes
        b, _, height, width = x.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(rows, cols, height, width)
        weights, feats = [], []
        hooks = []
        for block in self.blocks:  # each block also yields its attention map and attention output
            block.attn.fused_attn = False
            hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: weights.append(o)))
            hooks.append(block.attn.register_forward_hook(lambda m, i, o: feats.append(o)))
        for block in self.blocks:
            x = block(x)
        for hook in hooks:
            hook.remove()
        x_cls, x_patch = x[:, :c], x[:, c:]
        x_patch = x_patch.reshape(b, rows, cols, self.width).permute(0, 3, 1, 2).contiguous()
        x_patch = self.head(x_patch)
        out = {"cls_logits": x_cls.mean(-1), "coarse_logits": x_patch.mean((2, 3)), "coarse_cam": x_patch}
        attn = torch.stack(weights).detach()  # K, B, H, T, T
        coarse_cam = torch.relu(x_patch.detach())
        if self.fusion == "aaf":
            k, _, h, n, m = attn.shape
            attn = attn.permute(1, 2, 0, 3, 4).contiguous().view(b, h * k, n, m)  # map index h * K + k
            feat = torch.stack(feats).detach()  # K, B, T, D
            # (D/H, H): the head index runs fastest, then (B, H, K, T, D/H) -> (B, H*K, T, D/H).
            feat = feat.view(k, b, n, -1, h).permute(1, 4, 0, 2, 3).contiguous().view(b, h * k, n, -1)
            cross_map, patch_map = self.adaptive_attention_fusion(feat, attn)
            cross = cross_map.mean(1)[:, :c, c:].reshape(b, c, rows, cols)
            patch_attn = patch_map.mean(1)[:, c:, c:]
        else:  # MCTformer-V2: head mean; CA summed over the last n layers, PA over all layers
            mean = attn.mean(2)
            cross = mean[-self.mctformer_layers:].sum(0)[:, :c, c:].reshape(b, c, rows, cols)
            patch_attn = mean.sum(0)[:, c:, c:]
        cams = cross * coarse_cam
        out.update(cross_attention=cross, fused_cam=cams, patch_attention=patch_attn)
        if self.fusion == "aaf":
            fine = torch.matmul(patch_attn.unsqueeze(1), cams.view(b, c, -1, 1)).reshape(b, c, rows, cols)
            out["fine_logits"] = fine.mean((2, 3))
        return out


def official_cams(outputs: dict, attention_type: str) -> torch.Tensor:
    """`models.py` WeakTr.forward's CAM for `attention_type`: "fused" CA * ReLU(Z), "patchcam" ReLU(Z), any
    other value the cross attention CA."""
    if attention_type == "fused":
        return outputs["fused_cam"]
    if attention_type == "patchcam":
        return torch.relu(outputs["coarse_cam"])
    return outputs["cross_attention"]


@torch.no_grad()
def official_image_cams(model: TorchWeakTr, image: np.ndarray, labels: np.ndarray, scales,
                        attention_types=("fused", "patchcam", "cross"),
                        patch_attn_refine=(True, False)) -> dict[tuple[str, bool], dict[str, np.ndarray]]:
    """The official CAMs of one uint8 (H, W, 3) image for each attention type and refinement setting,
    from one forward pass per view: {(attention_type, patch_attn_refine): {"sum_cam": the sum over the
    views (C, H, W), "cams": its present classes min-max normalised, absent classes 0}}.

    The dataset makes the views: per scale, PIL's bicubic resize of the PIL image to (round(W s),
    round(H s)), ToTensor + ImageNet Normalize, then the whole view and its horizontal flip. The engine,
    per view: the model's CAM (its stride-p embedding drops the remainder), refined by the patch
    attention or not, bilinearly upsampled to the first view's size, times the labels, un-flipped for
    flipped views; then the sum over views and the per-class min-max normalisation. fp32 (the engine
    runs under autocast)."""
    pil = PIL.Image.fromarray(image)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    views = []
    for scale in scales:
        scaled = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), resample=PIL.Image.BICUBIC)
        tensor = (torch.from_numpy(np.asarray(scaled).copy()).permute(2, 0, 1).float().div(255) - mean) / std
        views += [tensor, torch.flip(tensor, [-1])]
    height, width = views[0].shape[1:]
    target = torch.from_numpy(np.asarray(labels, np.float32))
    settings = [(kind, refine) for kind in attention_types for refine in patch_attn_refine]
    cam_lists = {setting: [] for setting in settings}
    for index, view in enumerate(views):
        outputs = model(view[None])
        for kind, refine in settings:
            cams = official_cams(outputs, kind)
            b, c, rows, cols = cams.shape
            if refine:
                patch_attn = outputs["patch_attention"]
                cams = torch.matmul(patch_attn.unsqueeze(1), cams.view(b, c, -1, 1)).reshape(b, c, rows, cols)
            cams = nn.functional.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False)[0]
            cams = cams * target.view(c, 1, 1)
            cam_lists[kind, refine].append(torch.flip(cams, dims=[-1]) if index % 2 else cams)
    results = {}
    for setting, cam_list in cam_lists.items():
        total = torch.stack(cam_list).sum(0)
        result = torch.zeros_like(total)
        for cls in torch.nonzero(target > 0).flatten().tolist():
            cam = total[cls]
            result[cls] = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
        results[setting] = {"sum_cam": total.numpy(), "cams": result.numpy()}
    return results


def random_torch_weaktr(fusion="aaf", mctformer_layers=None, sizes=TINY, seed=0) -> TorchWeakTr:
    """A reference model whose parameters are all drawn from N(0, 0.3^2), so none sits at an init value
    that would hide a mix-up."""
    torch.manual_seed(seed)
    model = TorchWeakTr(**sizes, fusion=fusion, mctformer_layers=mctformer_layers)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


def torch_cam_loss(outputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """engine.py's stage-1 loss: the sum of the multilabel soft-margin losses of the class-token, coarse
    and (WeakTr only) fine logits."""
    criterion = nn.MultiLabelSoftMarginLoss()
    return sum(criterion(outputs[f"{name}_logits"], labels)
               for name in ("cls", "coarse", "fine") if f"{name}_logits" in outputs)
