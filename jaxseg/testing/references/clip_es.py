"""A PyTorch reference of OpenAI's CLIP (ViT image tower) and of CLIP-ES's CAM pipeline, written from the
official code (linyq2117/CLIP-ES at `3893f81`: `clip/model.py` with its last-layer changes,
`generate_cams_voc12.py` (GradCAM targets, CAA refinement), `utils.py` scoremap2bbox,
`pytorch_grad_cam/base_cam.py`, `grad_cam.py`, `activations_and_gradients.py`, `utils/image.py`).

Parameter names are OpenAI's (`visual.conv1`, `visual.class_embedding`, `visual.transformer.resblocks.i.
{ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `token_embedding`, ...), so its
state dict stands in for a released checkpoint. Differences from the original, all numerically neutral
in float32: no float16 (CLIP-ES casts the resampled position embedding to float16 even on CPU); OpenCV's
contours and `cv2.resize` are replaced by scipy's 8-connected components with their bounding slices and
by torch's bilinear interpolation (align_corners=False, which is cv2's INTER_LINEAR when enlarging).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

# A tiny CLIP: image width 64 with 2 blocks of 4 heads at patch 8 on a 4 x 4 grid, text width 32 with 2
# blocks of 2 heads over a 40-token vocabulary and 12 positions, joint width 24.
TINY = dict(embed_dim=24, image_resolution=32, vision_layers=2, vision_width=64, vision_heads=4,
            vision_patch_size=8, context_length=12, vocab_size=40, transformer_width=32, transformer_heads=2,
            transformer_layers=2)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x):
        """(L, N, D) -> (output, head-mean attention (N, L, L)), as CLIP-ES's block returns both."""
        out, weights = self.attn(*(self.ln_1(x),) * 3, need_weights=True, attn_mask=self.attn_mask)
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x, layers):
        weights = []
        for block in self.resblocks[:layers]:
            x, w = block(x)
            weights.append(w)
        return x, weights


def upsample_pos_emb(emb, new_size):
    """CLIP-ES's `upsample_pos_emb`: the grid part resized bilinearly (F.upsample), the class entry kept."""
    first, grid = emb[:1], emb[1:]
    side = int(np.sqrt(grid.shape[0]))
    grid = grid.permute(1, 0).reshape(1, -1, side, side)
    grid = F.interpolate(grid, size=new_size, mode="bilinear")
    return torch.cat([first, grid.reshape(emb.shape[1], -1).permute(1, 0)], 0)


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x):
        """NCHW images -> (L, N, D) tokens after ln_pre, the position embedding resampled to the grid."""
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], 1) + upsample_pos_emb(self.positional_embedding, grid)
        return self.ln_pre(x).permute(1, 0, 2)


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_heads, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_heads, embed_dim)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, mask)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(transformer_width ** -0.5 * torch.randn(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def encode_text(self, text):
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        x, _ = self.transformer(x, len(self.transformer.resblocks))
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def encode_image(self, image):
        """Plain CLIP: the class token after ln_post, projected."""
        x, _ = self.visual.transformer(self.visual.tokens(image), len(self.visual.transformer.resblocks))
        return self.visual.ln_post(x.permute(1, 0, 2)[:, 0]) @ self.visual.proj

    def encode_image_es(self, image):
        """CLIP-ES's `encode_image`: all blocks but the last, without gradients."""
        with torch.no_grad():
            return self.visual.transformer(self.visual.tokens(image), len(self.visual.transformer.resblocks) - 1)

    def forward_last_layer(self, image_features, text_features):
        """CLIP-ES's: the last block, ln_post, the mean of the patch tokens, projection; softmax over the
        given text features of the scaled cosine similarities."""
        x, attn_weight = self.visual.transformer.resblocks[-1](image_features)
        x = self.visual.ln_post(x.permute(1, 0, 2))
        x = torch.mean(x[:, 1:, :], dim=1) @ self.visual.proj
        x = x / x.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        return (self.logit_scale.exp() * x @ text_features.t()).softmax(dim=-1), attn_weight


def random_clip(seed: int = 0, **overrides) -> CLIP:
    """A tiny reference CLIP in eval mode whose parameters are all random (norms and biases included)."""
    torch.manual_seed(seed)
    model = CLIP(**dict(TINY, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "logit_scale":
                norm = param.ndim == 1 and name.endswith("weight")  # the LayerNorms
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if norm else 0.0))
    return model


def zeroshot_classifier(model: CLIP, token_ids: torch.Tensor, num_templates: int) -> torch.Tensor:
    """CLIP-ES's `zeroshot_classifier` on class-major token ids: (classes, E) unit features."""
    with torch.no_grad():
        features = model.encode_text(token_ids)
        features = features / features.norm(dim=-1, keepdim=True)
        features = features.reshape(-1, num_templates, features.shape[-1]).mean(1)
        return features / features.norm(dim=-1, keepdim=True)


def scale_cam_image(cam):
    """pytorch_grad_cam's `scale_cam_image` without resizing."""
    result = []
    for img in cam:
        img = img - np.min(img)
        result.append(img / (1e-7 + np.max(img)))
    return np.float32(result)


def grad_cam(model: CLIP, image_features, text_features, target: int, grid):
    """pytorch_grad_cam's GradCAM with CLIP-ES's target layer (the last block's ln_1) and reshape (the class
    token dropped): (CAM (h, w) in [0, 1], softmax scores, the last block's attention)."""
    saved = {}

    def hook(module, inputs, output):
        saved["activation"] = output
        output.register_hook(lambda grad: saved.__setitem__("gradient", grad))

    handle = model.visual.transformer.resblocks[-1].ln_1.register_forward_hook(hook)
    try:
        probs, attn_weight = model.forward_last_layer(image_features, text_features)
        model.zero_grad()
        probs[:, target].sum().backward(retain_graph=True)
    finally:
        handle.remove()

    def reshape(tensor):  # (L, N, D) -> (N, D, h, w)
        tensor = tensor.permute(1, 0, 2)[:, 1:].reshape(tensor.shape[1], *grid, tensor.shape[2])
        return tensor.permute(0, 3, 1, 2).detach().numpy()

    activations, grads = reshape(saved["activation"]), reshape(saved["gradient"])
    weights = np.mean(grads, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0).astype(np.float32)
    cam = scale_cam_image(cam)[:, None]  # per target layer
    cam = np.mean(np.maximum(np.concatenate([cam], axis=1), 0), axis=1)  # aggregate_multi_layers
    return scale_cam_image(cam)[0], probs, attn_weight


def scoremap2bbox(scoremap, threshold):
    """CLIP-ES's `scoremap2bbox(multi_contour_eval=True)` with 8-connected components in place of
    OpenCV's outer contours (each contour bounds one 8-connected blob)."""
    height, width = scoremap.shape
    scoremap_image = (scoremap * 255).astype(np.uint8)
    binary = scoremap_image > int(threshold * np.max(scoremap_image))
    labels, count = scipy.ndimage.label(binary, structure=np.ones((3, 3)))
    if count == 0:
        return np.asarray([[0, 0, 0, 0]]), 1
    boxes = []
    for rows, cols in scipy.ndimage.find_objects(labels):
        boxes.append([cols.start, rows.start, min(cols.stop, width - 1), min(rows.stop, height - 1)])
    return np.asarray(boxes), len(boxes)


def preprocess(image: np.ndarray, patch_size: int) -> np.ndarray:
    """CLIP-ES's `img_ms_and_flip` at scale 1 without the flip: a uint8 (H, W, 3) image resized (torchvision,
    PIL bicubic) to the next patch multiples and CLIP-normalised, as (H', W', 3) float32."""
    from PIL import Image
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    height, width = image.shape[:2]
    size = (int(np.ceil(height / patch_size) * patch_size), int(np.ceil(width / patch_size) * patch_size))
    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return transform(Image.fromarray(image)).permute(1, 2, 0).numpy()


def clip_es_cams(model: CLIP, image: np.ndarray, fg_text, bg_text, label_ids, original_size, box_threshold,
                 affinity_layers: int = 8) -> dict:
    """One image through `generate_cams_voc12.py`'s `perform`: `image` (H', W', 3) CLIP-normalised at the
    patch-multiple size, `label_ids` the present classes in order. Returns the GradCAMs (K, h, w), the
    refined CAMs at `original_size` (K, H, W) and the affinity (P, P)."""
    patch = model.visual.patch_size
    grid = (image.shape[0] // patch, image.shape[1] // patch)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    image_features, attn_weight_list = model.encode_image_es(x)
    text = torch.cat([fg_text[label_ids], bg_text], dim=0)
    cams, refined = [], []
    for idx in range(len(label_ids)):
        cam, _, attn_weight_last = grad_cam(model, image_features, text, idx, grid)
        cams.append(cam)
        if idx == 0:
            attn_weight = torch.stack([aw[:, 1:, 1:] for aw in attn_weight_list + [attn_weight_last]])
            attn_weight = torch.mean(attn_weight[-affinity_layers:], dim=0)[0].detach().float()
        box, cnt = scoremap2bbox(cam, box_threshold)
        aff_mask = torch.zeros(cam.shape)
        for x0, y0, x1, y1 in box[:cnt]:
            aff_mask[y0:y1, x0:x1] = 1
        aff_mask = aff_mask.view(1, -1)
        trans_mat = attn_weight / torch.sum(attn_weight, dim=0, keepdim=True)
        trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)
        for _ in range(2):
            trans_mat = trans_mat / torch.sum(trans_mat, dim=0, keepdim=True)
            trans_mat = trans_mat / torch.sum(trans_mat, dim=1, keepdim=True)
        trans_mat = (trans_mat + trans_mat.transpose(1, 0)) / 2
        trans_mat = torch.matmul(trans_mat, trans_mat) * aff_mask
        cam_refined = torch.matmul(trans_mat, torch.from_numpy(cam).view(-1, 1)).reshape(grid).numpy()
        cam_refined = scale_cam_image([cam_refined])
        refined.append(F.interpolate(torch.from_numpy(cam_refined)[None], size=original_size,
                                     mode="bilinear")[0, 0].numpy())
    return {"cams": np.stack(cams), "refined": np.stack(refined), "affinity": attn_weight.numpy()}
