"""PyTorch reference of MAE's `MaskedAutoencoderViT` (facebookresearch/mae `models_mae.py` @ efb2a80):
timm blocks with LayerNorm eps 1e-6 (the official `mae_vit_*` factories), fixed sine-cosine position
embeddings in the encoder and the decoder, masking by argsort of per-patch noise, the normalised-pixel
loss on the removed patches. The noise is an argument (the official code draws it inside), so a test can
hand both implementations the same mask. `jax_params` maps its weights onto `jaxseg.models.mae.MAE`.
"""
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from jaxseg.convert.timm import block_from_timm, from_timm, layer_norm_from_torch, linear_from_torch

_ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """`util/pos_embed.py` `get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)`, (1 + g * g, D)."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    emb = np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


class TorchMAE(nn.Module):
    def __init__(self, img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0, norm_pix_loss=True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.grid = patch_size, img_size // patch_size
        num_patches = self.grid ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.norm_pix_loss = norm_pix_loss
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(sincos_2d(embed_dim, self.grid)).float()[None])
            self.decoder_pos_embed.copy_(torch.from_numpy(sincos_2d(decoder_embed_dim, self.grid)).float()[None])

    def patchify(self, imgs):
        p, h = self.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * 3)

    def random_masking(self, x, noise, mask_ratio):
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs, noise, mask_ratio):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        patches = torch.cat([x[:, 1:], mask_tokens], 1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], 1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, noise, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def randomize(model: TorchMAE, seed: int = 0) -> TorchMAE:
    """Every trainable parameter random (norm scales around 1), so that no mix-up hides behind an init
    value; the fixed position embeddings keep their sine-cosine tables."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale_like = name.endswith(".weight") and "norm" in name
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if scale_like else 0.0))
    return model


def jax_params(tensors: dict, num_heads: int, decoder_heads: int) -> dict:
    """`jaxseg.models.mae.MAE` params from a `TorchMAE` state dict, or from its gradients by name (a linear
    re-arrangement, so gradients map as weights do)."""
    sd = {k: np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    _, encoder = from_timm({k: v for k, v in sd.items() if k.startswith(_ENCODER_PREFIXES)}, num_heads=num_heads)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    params = {"encoder": encoder, "decoder_embed": linear_from_torch(sd, "decoder_embed"),
              "mask_token": sd["mask_token"], "decoder_norm": layer_norm_from_torch(sd, "decoder_norm"),
              "decoder_pred": linear_from_torch(sd, "decoder_pred")}
    for i in range(depth):
        params[f"decoder_blocks_{i}"] = block_from_timm(sd, f"decoder_blocks.{i}.", decoder_heads)
    return params
