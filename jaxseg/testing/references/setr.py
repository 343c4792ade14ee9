"""PyTorch reference of SETR as mmsegmentation builds it for the official configs, with torch.nn only (no
mmcv / mmseg): `SETRUPHead` (naive, PUP), `MLANeck` + `SETRMLAHead` (MLA) under mmseg's module names, the
backbone forward of mmseg's `VisionTransformer` (`out_indices`, `with_cls_token`, `final_norm=False`,
bilinear position-embedding resize) over a timm ViT's modules, and `EncoderDecoder`'s resize of the logits
to the input. Written from open-mmlab/mmsegmentation `mmseg/models/decode_heads/{setr_up_head,
setr_mla_head,decode_head}.py`, `mmseg/models/necks/mla_neck.py`, `mmseg/models/backbones/vit.py` and
`configs/_base_/models/setr_{naive,pup,mla}.py`. mmcv's ConvModule is conv (no bias) -> BatchNorm2d ->
ReLU; SyncBN is plain BatchNorm2d here, in whichever mode the caller sets (`.train()` / `.eval()`).
`to_flax` maps the reference's weights and running statistics onto `jaxseg.models.setr`.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Upsample(nn.Module):
    """mmseg.ops.Upsample: interpolation to int(scale * size), not F.interpolate(scale_factor=...)."""

    def __init__(self, scale_factor):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x):
        size = [int(t * self.scale_factor) for t in x.shape[-2:]]
        return F.interpolate(x, size, mode="bilinear", align_corners=False)


def _layer_norm_nchw(norm, x):
    n, c, h, w = x.shape
    x = norm(x.reshape(n, c, h * w).transpose(2, 1))
    return x.transpose(1, 2).reshape(n, c, h, w)


class SETRUPHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes, num_convs, up_scale, kernel_size):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.up_convs = nn.ModuleList()
        for i in range(num_convs):
            self.up_convs.append(nn.Sequential(ConvModule(in_channels if i == 0 else channels, channels, kernel_size),
                                               Upsample(up_scale)))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        x = _layer_norm_nchw(self.norm, inputs[-1])
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.conv_seg(x)


class MLANeck(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm = nn.ModuleList([nn.LayerNorm(c, eps=1e-6) for c in in_channels])
        self.mla = nn.Module()
        self.mla.channel_proj = nn.ModuleList([ConvModule(c, out_channels, 1) for c in in_channels])
        self.mla.feat_extract = nn.ModuleList([ConvModule(out_channels, out_channels, 3) for _ in in_channels])

    def forward(self, inputs):
        feats = [conv(_layer_norm_nchw(norm, x)) for x, norm, conv in zip(inputs, self.norm, self.mla.channel_proj)]
        mids = []
        for feat in feats[::-1]:
            mids.append(feat if not mids else mids[-1] + feat)
        return [conv(mid) for mid, conv in zip(mids, self.mla.feat_extract)]


class SETRMLAHead(nn.Module):
    def __init__(self, in_channels, mla_channels, num_classes, up_scale=4):
        super().__init__()
        self.up_convs = nn.ModuleList([nn.Sequential(ConvModule(c, mla_channels, 3), ConvModule(mla_channels,
                                                     mla_channels, 3), Upsample(up_scale)) for c in in_channels])
        self.conv_seg = nn.Conv2d(len(in_channels) * mla_channels, num_classes, 1)

    def forward(self, inputs):
        return self.conv_seg(torch.cat([up_conv(x) for x, up_conv in zip(inputs, self.up_convs)], 1))


def torch_decoder(kind, width, num_classes, channels, mla_channels=128, num_taps=4):
    """(neck or None, head) of a decoder kind, as the official configs build it at these widths."""
    if kind == "mla":
        return MLANeck([width] * num_taps, channels), SETRMLAHead([channels] * num_taps, mla_channels, num_classes)
    num_convs, up_scale, kernel_size = {"naive": (1, 4, 1), "pup": (4, 2, 3)}[kind]
    return None, SETRUPHead(width, channels, num_classes, num_convs, up_scale, kernel_size)


def randomize(module, seed=0):
    """Random weights everywhere (norm scales around 1) and random running statistics (variances > 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif tensor.ndim == 1 and name.endswith("weight"):
                values = 1.0 + 0.2 * values
            else:
                values = 0.2 * values
            tensor.copy_(values)
    return module


def vit_taps(vit, images, out_indices, with_cls_token=True):
    """mmseg VisionTransformer.forward (final_norm=False, interpolate_mode="bilinear") over a timm ViT's
    modules: NCHW images -> the outputs of the blocks `out_indices`, patch tokens as NCHW maps."""
    x = vit.patch_embed.proj(images)
    grid = x.shape[2:]
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos_embed = vit.pos_embed
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if x.shape[1] != pos_embed.shape[1]:
        table = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
        pos_embed = torch.cat([pos_embed[:, :1], table.flatten(2).transpose(1, 2)], 1)
    x = x + pos_embed
    if not with_cls_token:
        x = x[:, 1:]
    outs = []
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if i in out_indices:
            out = x[:, 1:] if with_cls_token else x
            outs.append(out.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2))
    return outs


def torch_setr(vit, neck, head, images, out_indices, with_cls_token=True):
    """EncoderDecoder.encode_decode: NCHW images -> logits at the input size."""
    taps = vit_taps(vit, images, out_indices, with_cls_token)
    logits = head(neck(taps) if neck is not None else taps)
    return F.interpolate(logits, images.shape[2:], mode="bilinear", align_corners=False)


def _numpy(tensor):
    return tensor.detach().numpy().astype(np.float32)


def _conv_module(module):
    params = {"conv": {"kernel": _numpy(module.conv.weight).transpose(2, 3, 1, 0)},
              "bn": {"scale": _numpy(module.bn.weight), "bias": _numpy(module.bn.bias)}}
    return params, {"bn": {"mean": _numpy(module.bn.running_mean), "var": _numpy(module.bn.running_var)}}


def _layer_norm(norm):
    return {"scale": _numpy(norm.weight), "bias": _numpy(norm.bias)}


def _conv_seg(conv):
    return {"kernel": _numpy(conv.weight).transpose(2, 3, 1, 0), "bias": _numpy(conv.bias)}


def to_flax(neck, head):
    """{"params": {["neck"], "head"}, "batch_stats": ...} of `jaxseg.models.setr.Setr` from the reference."""
    params, stats = {}, {}
    if isinstance(head, SETRUPHead):
        params["head"], stats["head"] = {"norm": _layer_norm(head.norm), "conv_seg": _conv_seg(head.conv_seg)}, {}
        for i, up_conv in enumerate(head.up_convs):
            params["head"][f"up_convs_{i}"], stats["head"][f"up_convs_{i}"] = _conv_module(up_conv[0])
        return {"params": params, "batch_stats": stats}
    params["neck"], stats["neck"] = {}, {}
    for i, norm in enumerate(neck.norm):
        params["neck"][f"norm_{i}"] = _layer_norm(norm)
    for kind in ("channel_proj", "feat_extract"):
        for i, module in enumerate(getattr(neck.mla, kind)):
            params["neck"][f"{kind}_{i}"], stats["neck"][f"{kind}_{i}"] = _conv_module(module)
    params["head"], stats["head"] = {"conv_seg": _conv_seg(head.conv_seg)}, {}
    for i, up_conv in enumerate(head.up_convs):
        for j in range(2):
            params["head"][f"up_convs_{i}_{j}"], stats["head"][f"up_convs_{i}_{j}"] = _conv_module(up_conv[j])
    return {"params": params, "batch_stats": stats}
