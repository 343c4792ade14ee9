"""WeakTr stage 1 against a PyTorch reference written here from the official code (hustvl/WeakTr
`models.py` WeakTr.forward / interpolate_pos_encoding and `AAF.py`, V3), random weights, CPU, float32.
No pip-installable WeakTr exists; the reference reuses timm's ViT blocks (as WeakTr's own
`vision_transformer.py` does) and spells out each reshape of the original. Tolerance 1e-5 relative
(1e-4 for gradients).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from jaxseg.convert import from_timm
from jaxseg.losses.multilabel import cam_loss
from jaxseg.models.vit import ViT
from jaxseg.models.weaktr import WeakTr
from timm_reference import rel_err

C, D, DEPTH, HEADS, PATCH, GRID0 = 5, 64, 2, 4, 8, 4


class TorchAAF(nn.Module):
    """AAF.py's AAF: token pooling, a per-map 2-layer FFN without activation, a head FFN with sigmoid."""

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
    def __init__(self, fusion="aaf", mctformer_layers=DEPTH):
        super().__init__()
        self.fusion, self.mctformer_layers = fusion, mctformer_layers
        self.patch_embed = nn.Conv2d(3, D, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, C, D) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, C + GRID0 ** 2, D) * 0.02)
        self.blocks = nn.ModuleList([Block(D, HEADS, mlp_ratio=4, qkv_bias=True,
                                           norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                     for _ in range(DEPTH)])
        self.head = nn.Conv2d(D, C, 3, padding=1)
        self.aaf = TorchAAF(DEPTH * HEADS, 8 if DEPTH * HEADS >= 8 else 1, D // HEADS, 8)

    def interpolate_pos_encoding(self, rows, cols):
        n = self.pos_embed.shape[1] - C
        side = int(n ** 0.5)
        if rows * cols == n and rows == cols:
            return self.pos_embed
        patch = self.pos_embed[:, C:].reshape(1, side, side, D).permute(0, 3, 1, 2)
        patch = nn.functional.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                                          mode="bicubic")
        return torch.cat([self.pos_embed[:, :C], patch.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)

    def forward(self, x):
        b, _, height, width = x.shape
        rows, cols = height // PATCH, width // PATCH
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(rows, cols)
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
        x_cls, x_patch = x[:, :C], x[:, C:]
        x_patch = x_patch.reshape(b, rows, cols, D).permute(0, 3, 1, 2).contiguous()
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
            cross_map, patch_map = self.aaf(feat, attn)
            cross = cross_map.mean(1)[:, :C, C:].reshape(b, C, rows, cols)
            patch_attn = patch_map.mean(1)[:, C:, C:]
        else:  # MCTformer-V2: head mean; CA summed over the last n layers, PA over all layers
            mean = attn.mean(2)
            cross = mean[-self.mctformer_layers:].sum(0)[:, :C, C:].reshape(b, C, rows, cols)
            patch_attn = mean.sum(0)[:, C:, C:]
        cams = cross * coarse_cam
        out.update(fused_cam=cams, patch_attention=patch_attn)
        if self.fusion == "aaf":
            fine = torch.matmul(patch_attn.unsqueeze(1), cams.view(b, C, -1, 1)).reshape(b, C, rows, cols)
            out["fine_logits"] = fine.mean((2, 3))
        return out


def _convert(torch_model, fusion, mctformer_layers=DEPTH):
    sd = {k.replace("patch_embed.", "patch_embed.proj."): v.detach().numpy()
          for k, v in torch_model.state_dict().items() if not k.startswith(("head.", "aaf."))}
    encoder, encoder_params = from_timm(sd, num_heads=HEADS, posemb_resize="dino")
    head = torch_model.head
    params = {"encoder": encoder_params,
              "head": {"kernel": head.weight.detach().numpy().transpose(2, 3, 1, 0),
                       "bias": head.bias.detach().numpy()}}
    if fusion == "aaf":
        def linear(layer):
            out = {"kernel": layer.weight.detach().numpy().T}
            if layer.bias is not None:
                out["bias"] = layer.bias.detach().numpy()
            return out
        aaf = torch_model.aaf
        params["aaf"] = {"feat_fc1": linear(aaf.attn_feat_ffn[0]), "feat_fc2": linear(aaf.attn_feat_ffn[1]),
                         "head_fc1": linear(aaf.attn_head_ffn[0]), "head_fc2": linear(aaf.attn_head_ffn[2])}
    model = WeakTr(encoder=encoder, num_classes=C, fusion=fusion,
                   reduction=8 if DEPTH * HEADS >= 8 else 1, mctformer_layers=mctformer_layers)
    return model, params


def _random_torch(fusion, mctformer_layers=DEPTH):
    torch.manual_seed(0)
    model = TorchWeakTr(fusion, mctformer_layers)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


IMAGES = np.random.default_rng(1).standard_normal((2, 48, 32, 3)).astype(np.float32)  # 6 x 4 grid
LABELS = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], np.float32)


@pytest.mark.parametrize("fusion,layers", [("aaf", DEPTH), ("mctformer", DEPTH), ("mctformer", 1)])
def test_outputs_and_losses_match_reference(fusion, layers):
    torch_model = _random_torch(fusion, layers)
    expected = torch_model(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    model, params = _convert(torch_model, fusion, layers)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, IMAGES)
    errors = {k: rel_err(out[k], v.detach().numpy()) for k, v in expected.items()}
    criterion = torch.nn.MultiLabelSoftMarginLoss()
    expected_loss = sum(criterion(expected[f"{n}_logits"], torch.from_numpy(LABELS))
                        for n in ("cls", "coarse", "fine") if f"{n}_logits" in expected)
    errors["loss"] = rel_err(cam_loss(out, LABELS)[0], expected_loss.item())
    print(fusion, layers, errors)
    assert max(errors.values()) <= 1e-5, errors


def test_gradient_paths_follow_the_spec():
    """The fine-CAM loss trains only the AAF; the class-token loss reaches the encoder but not the head;
    the coarse loss reaches encoder and head but not the AAF. AAF gradients match the reference."""
    torch_model = _random_torch("aaf")
    model, params = _convert(torch_model, "aaf")

    def term_grads(name):
        return jax.grad(lambda p: cam_loss(model.apply({"params": p}, IMAGES), LABELS)[1][name])(params)

    def norm(tree):
        return float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(tree)))

    fine, cls, coarse = term_grads("fine"), term_grads("cls"), term_grads("coarse")
    assert norm(fine["encoder"]) == 0.0 and norm(fine["head"]) == 0.0 and norm(fine["aaf"]) > 0
    assert norm(cls["head"]) == 0.0 and norm(cls["aaf"]) == 0.0 and norm(cls["encoder"]) > 0
    assert norm(coarse["aaf"]) == 0.0 and norm(coarse["head"]) > 0 and norm(coarse["encoder"]) > 0
    assert norm(cls["encoder"]["cls_token"]) > 0 and norm(cls["encoder"]["pos_embed"]) > 0

    expected = torch_model(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    torch.nn.MultiLabelSoftMarginLoss()(expected["fine_logits"], torch.from_numpy(LABELS)).backward()
    aaf = torch_model.aaf
    assert rel_err(fine["aaf"]["head_fc1"]["kernel"], aaf.attn_head_ffn[0].weight.grad.numpy().T) <= 1e-4
    assert rel_err(fine["aaf"]["feat_fc1"]["kernel"], aaf.attn_feat_ffn[0].weight.grad.numpy().T) <= 1e-4


def test_layerwise_fusion_equals_stacking_every_map():
    """The memory-saving, recomputing fusion equals fusing the stacked maps of a plain forward pass."""
    torch_model = _random_torch("aaf")
    model, params = _convert(torch_model, "aaf")
    out = model.apply({"params": params}, IMAGES)
    vit = ViT(**model.encoder)
    _, inter = vit.apply({"params": params["encoder"]}, IMAGES, return_attention=True)
    maps = jnp.stack(inter["attn_probs"], axis=2)  # (B, H, K, T, T): index h * K + k once flattened
    # The same AAF weights, fused over the stacked maps of the plain forward pass.
    weights = model.apply({"params": params}, IMAGES, method=lambda m, x: _aaf_weights(m, x))
    fused = jnp.einsum("bhk,bhkij->bij", weights, maps) / weights[0].size
    np.testing.assert_allclose(out["patch_attention"], fused[:, C:, C:], rtol=1e-5, atol=1e-7)


def _aaf_weights(module, images):
    vit = module.vit
    x = vit.embed(images)
    pooled = []
    for block in vit.blocks:
        x, aux = block(x)
        pooled.append(aux["attn_out"].reshape(x.shape[0], x.shape[1], -1, vit.num_heads).max(1))
    features = jnp.transpose(jnp.stack(pooled, 1), (0, 3, 1, 2)).reshape(x.shape[0], -1, pooled[0].shape[1])
    return module.aaf(features).reshape(x.shape[0], vit.num_heads, vit.depth)


def test_bad_configurations_are_named():
    encoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(2, 2),
                   num_cls_tokens=3, final_norm=False)
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="one class token per class"):
        WeakTr(encoder=encoder, num_classes=4).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="final_norm=False"):
        WeakTr(encoder=dict(encoder, final_norm=True), num_classes=3).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="AAF reductions too large"):
        WeakTr(encoder=encoder, num_classes=3, reduction=8).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="fusion must be one of"):
        WeakTr(encoder=encoder, num_classes=3, fusion="mean").init(jax.random.key(0), images)
