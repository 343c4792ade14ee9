"""A PyTorch reference of AFA (Ru et al., CVPR 2022), written from rulixiang/afa (`wetr/PAR.py`,
`wetr/model_attn_aff.py`, `wetr/mix_transformer.py` Attention, `utils/camutils.py`, `utils/losses.py`,
`scripts/dist_train_voc.py`) and, for the plain-ViT form, rulixiang/ToCo (`model/model_seg_neg.py`,
`model/decoder/conv_head.py` LargeFOV). torch.nn only.

The official network is a SegFormer MiT-B1; `TorchAfa` puts the same heads on a timm ViT: the affinity
head reads the raw, unscaled attention logits q . k^T of the chosen blocks' patch tokens (MiT's `attn_`
before its scale and softmax), symmetrised, a 1x1 conv over the maps and a sigmoid; the classifier a
bias-free 1x1 conv after global max (or average) pooling of the final patch tokens; the segmentation head
ToCo's LargeFOV. The functions follow the official training script's order: multi-scale CAMs with the
largest scale's affinity, PAR pseudo-labels, affinity labels and loss, the random walk and its PAR labels,
the split cross-entropy.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxseg.convert import from_timm


class TorchPAR(nn.Module):
    """`wetr/PAR.py`: neighbours by one-hot 3x3 dilated convolutions of replicate-padded maps."""

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01):
        super().__init__()
        self.dilations, self.num_iter, self.w1, self.w2 = list(dilations), num_iter, w1, w2
        kernel = torch.zeros(8, 1, 3, 3)
        for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
            kernel[i, 0, r, c] = 1
        self.register_buffer("kernel", kernel)
        step = torch.ones(1, 1, 8, 1, 1)
        step[0, 0, [0, 2, 5, 7]] = math.sqrt(2)
        self.pos = torch.cat([step * d for d in self.dilations], dim=2)

    def neighbours(self, x):
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            padded = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(padded, self.kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    def forward(self, images, masks):
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
        b, _, h, w = images.shape
        near = self.neighbours(images)
        pos = self.pos.repeat(b, 1, 1, h, w)
        diff = torch.abs(near - images.unsqueeze(2))
        colour = -(diff / (torch.std(near, dim=2, keepdim=True) + 1e-8) / self.w1) ** 2
        position = -(pos / (torch.std(pos, dim=2, keepdim=True) + 1e-8) / self.w1) ** 2
        weights = F.softmax(colour.mean(dim=1, keepdim=True), dim=2) + self.w2 * F.softmax(position, dim=2)
        for _ in range(self.num_iter):
            masks = (self.neighbours(masks) * weights).sum(2)
        return masks


def par_pseudo_labels(par, images, cams, cls_labels, img_box, low, high, ignore_index=255, down_scale=2):
    """`refine_cams_with_bkg_v2`: images (B, 3, H, W), cams (B, C, H, W), boxes [top, bottom, left, right]."""
    b, _, h, w = images.shape
    small = [h // down_scale, w // down_scale]
    small_images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    keys_all = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
    result = {}
    for name, threshold in (("high", high), ("low", low)):
        scores = torch.cat([torch.full((b, 1, h, w), float(threshold)), cams], dim=1)
        scores = F.interpolate(scores, size=small, mode="bilinear", align_corners=False)
        labels = torch.full((b, h, w), float(ignore_index))
        for i, box in enumerate(img_box):
            keys = torch.nonzero(keys_all[i])[:, 0]
            probs = scores[i, keys].unsqueeze(0).softmax(dim=1)
            refined = F.interpolate(par(small_images[[i]], probs), size=(h, w), mode="bilinear", align_corners=False)
            label = keys[refined.argmax(dim=1)]
            labels[i, box[0]:box[1], box[2]:box[3]] = label[0, box[0]:box[1], box[2]:box[3]].float()
        result[name] = labels
    joined = result["high"].clone()
    joined[result["high"] == 0] = ignore_index
    joined[(result["high"] + result["low"]) == 0] = 0
    return joined


def radius_mask(h, w, radius):
    """`get_mask_by_radius`: 1 where two cells of the h x w grid are at most `radius` apart on each axis."""
    mask = np.zeros((h * w, h * w))
    for i in range(h * w):
        r, c = divmod(i, w)
        for rr in range(max(0, r - radius), min(h, r + radius + 1)):
            for cc in range(max(0, c - radius), min(w, c + radius + 1)):
                mask[i, rr * w + cc] = mask[rr * w + cc, i] = 1
    return mask


def affinity_labels(cam_label, patch, mask=None, ignore_index=255):
    """`cams_to_affinity_label` with the stride as `patch`: nearest-downsampled labels, 1 for equal pairs,
    0 for different ones, ignored outside the mask and where either label is ignored."""
    b, h, w = cam_label.shape
    small = F.interpolate(cam_label.unsqueeze(1).float(), size=[h // patch, w // patch], mode="nearest")
    flat = small.reshape(b, 1, -1)
    rows = flat.repeat([1, flat.shape[-1], 1])
    out = (rows == rows.permute(0, 2, 1)).long()
    for i in range(b):
        if mask is not None:
            out[i, torch.as_tensor(mask) == 0] = ignore_index
        out[i, :, rows[i, 0] == ignore_index] = ignore_index
        out[i, rows[i, 0] == ignore_index, :] = ignore_index
    return out


def affinity_loss(pred, target):
    """`get_aff_loss`: half the mean (1 - pred) over positive pairs plus half the mean pred over negative
    ones, each count plus one."""
    pos = (target == 1).float()
    neg = (target == 0).float()
    return 0.5 * (pos * (1 - pred)).sum() / (pos.sum() + 1) + 0.5 * (neg * pred).sum() / (neg.sum() + 1)


def split_cross_entropy(pred, label, ignore_index=255):
    """`get_seg_loss`: the mean CE over background pixels and over foreground pixels, averaged."""
    background = label.clone()
    background[label != 0] = ignore_index
    foreground = label.clone()
    foreground[label == 0] = ignore_index
    return 0.5 * (F.cross_entropy(pred, background, ignore_index=ignore_index)
                  + F.cross_entropy(pred, foreground, ignore_index=ignore_index))


def propagate_cams(cams, aff, mask, cls_labels, bkg_score, power=2, eps=0.1):
    """`propagte_aff_cam_with_bkg` (no matrix powers, as the official n_log_iter = 0)."""
    b, _, h, w = cams.shape
    scores = torch.cat([torch.full((b, 1, h, w), float(bkg_score)), cams], dim=1)
    keys_all = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
    aff = aff.clone()
    if mask is not None:
        for i in range(b):
            aff[i, torch.as_tensor(mask) == 0] = 0
    aff = aff ** power
    aff = aff / (aff.sum(dim=1, keepdim=True) + eps)
    out = torch.zeros_like(scores)
    for i in range(b):
        keys = torch.nonzero(keys_all[i])[:, 0]
        probs = F.softmax(scores[i].reshape(scores.shape[1], -1)[keys], dim=0)
        out[i, keys] = (probs @ aff[i]).reshape(-1, h, w)
    return out


def refine_with_labels(par, images, cams, keys_all, img_box):
    """`refine_cams_with_cls_label`: each image cut to its box, halved, PAR over its present keys, resized
    back; zero elsewhere."""
    out = torch.zeros_like(cams)
    for i, box in enumerate(img_box):
        crop = images[[i], :, box[0]:box[1], box[2]:box[3]]
        h, w = crop.shape[2:]
        small = F.interpolate(crop, size=[h // 2, w // 2], mode="bilinear", align_corners=False)
        keys = torch.nonzero(keys_all[i])[:, 0]
        refined = par(small, cams[[i], :, box[0]:box[1], box[2]:box[3]][:, keys])
        out[i, keys, box[0]:box[1], box[2]:box[3]] = F.interpolate(refined, size=(h, w), mode="bilinear",
                                                                   align_corners=False)[0]
    return out


def random_walk_labels(par, images, cams, aff, mask, cls_labels, img_box, grid, low, high, ignore_index=255):
    """The training script's `refined_aff_label`: the labelled CAMs resized to the affinity's grid,
    propagated at each background threshold, resized back, PAR-refined, joined as the PAR labels."""
    b, _, h, w = images.shape
    valid_cam = F.interpolate(cams * cls_labels[:, :, None, None], size=grid, mode="bilinear", align_corners=False)
    keys_all = torch.cat([torch.ones(b, 1), cls_labels], dim=1)
    labels = {}
    for name, threshold in (("low", low), ("high", high)):
        propagated = propagate_cams(valid_cam, aff, mask, cls_labels, threshold)
        propagated = F.interpolate(propagated, size=(h, w), mode="bilinear", align_corners=False)
        labels[name] = refine_with_labels(par, images, propagated, keys_all, img_box).argmax(dim=1)
    joined = labels["high"].clone()
    joined[labels["high"] == 0] = ignore_index
    joined[(labels["high"] + labels["low"]) == 0] = 0
    out = torch.full_like(joined, ignore_index)
    for i, box in enumerate(img_box):
        out[i, box[0]:box[1], box[2]:box[3]] = joined[i, box[0]:box[1], box[2]:box[3]]
    return out


class LargeFOV(nn.Module):
    """ToCo's `LargeFOV`: two dilated bias-free 3x3 convs with ReLU, a bias-free 1x1 classifier."""

    def __init__(self, in_planes, out_planes, width=512, dilation=5):
        super().__init__()
        self.conv6 = nn.Conv2d(in_planes, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(width, out_planes, 1, bias=False)

    def forward(self, x):
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))


class TorchAfa(nn.Module):
    """AFA's heads on a timm ViT `encoder` (module docstring). `num_classes` counts the background (the
    classifier has num_classes - 1 outputs, as the official); `affinity_layers` last blocks feed the
    affinity head."""

    def __init__(self, encoder, num_classes, affinity_layers, pooling="gmp", decoder_width=512, dilation=5):
        super().__init__()
        self.encoder, self.affinity_layers, self.pooling = encoder, affinity_layers, pooling
        dim, heads = encoder.embed_dim, encoder.blocks[0].attn.num_heads
        self.classifier = nn.Conv2d(dim, num_classes - 1, 1, bias=False)
        self.attn_proj = nn.Conv2d(heads * affinity_layers, 1, 1, bias=True)
        nn.init.kaiming_normal_(self.attn_proj.weight, a=np.sqrt(5), mode="fan_out")
        self.decoder = LargeFOV(dim, num_classes, decoder_width, dilation)

    def features(self, x):
        """(patch tokens after the final norm (B, D, h, w), [raw attention logits (B, heads, P, P)])."""
        enc = self.encoder
        h, w = x.shape[2] // enc.patch_embed.patch_size[0], x.shape[3] // enc.patch_embed.patch_size[1]
        tokens = enc._pos_embed(enc.patch_embed(x))
        prefix = enc.num_prefix_tokens
        logits = []
        for block in enc.blocks:
            normed = block.norm1(tokens)
            b, n, c = normed.shape
            qkv = block.attn.qkv(normed).reshape(b, n, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = block.attn.q_norm(qkv[0]), block.attn.k_norm(qkv[1])
            logits.append((q @ k.transpose(-2, -1))[:, :, prefix:, prefix:])
            tokens = block(tokens)
        tokens = enc.norm(tokens)[:, prefix:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w), logits

    def forward(self, x, cam_only=False):
        feats, logits = self.features(x)
        maps = torch.cat(logits[-self.affinity_layers:], dim=1)
        maps = maps + maps.permute(0, 1, 3, 2)
        affinity = torch.sigmoid(self.attn_proj(maps))[:, 0]
        if cam_only:
            return F.conv2d(feats, self.classifier.weight).detach(), affinity
        pool = F.adaptive_max_pool2d if self.pooling == "gmp" else F.adaptive_avg_pool2d
        cls = self.classifier(pool(feats, (1, 1))).flatten(1)
        return cls, self.decoder(feats), affinity


def multi_scale_cams(model, inputs, scales):
    """`multi_scale_cam_with_aff_mat`: per scale, the CAMs of the input and its flip (bilinear resizes),
    their maximum, ReLU; summed over the scales, min-max normalised per class (eps 1e-5); the affinity of
    the largest scale's unflipped pass."""
    b, _, h, w = inputs.shape
    cams, affinities = [], []
    with torch.no_grad():
        for s in scales:
            x = inputs if s == 1.0 else F.interpolate(inputs, size=(int(s * h), int(s * w)), mode="bilinear",
                                                      align_corners=False)
            cam, aff = model(torch.cat([x, x.flip(-1)], dim=0), cam_only=True)
            affinities.append(aff)
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            cams.append(F.relu(torch.max(cam[:b], cam[b:].flip(-1))))
        cam = torch.stack(cams).sum(0)
        cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
        cam = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)
    return cam, affinities[int(np.argmax(scales))][:b]


def jaxseg_params(model: TorchAfa) -> tuple[dict, dict]:
    """(encoder config, params of `jaxseg.models.afa.Afa`) holding `model`'s weights (no official AFA
    checkpoint on a plain ViT exists: this is the tests' converter)."""
    return jaxseg_tree({k: v.detach() for k, v in model.state_dict().items()},
                       model.encoder.blocks[0].attn.num_heads)


def jaxseg_tree(state: dict, num_heads: int) -> tuple[dict, dict]:
    """`jaxseg_params` of a state dict of tensors; of gradients too (every step is a transpose or a reshape)."""
    encoder = {k[len("encoder."):]: v.numpy() for k, v in state.items() if k.startswith("encoder.")}
    config, params = from_timm(encoder, num_heads=num_heads)

    def conv(name):
        return np.transpose(state[f"decoder.{name}.weight"].numpy(), (2, 3, 1, 0))
    return config, {"encoder": params, "classifier": state["classifier.weight"].numpy()[:, :, 0, 0].T,
                    "affinity": {"kernel": state["attn_proj.weight"].numpy().reshape(-1),
                                 "bias": state["attn_proj.bias"].numpy()},
                    "decoder": {name: {"kernel": conv(name)} for name in ("conv6", "conv7", "conv8")}}
