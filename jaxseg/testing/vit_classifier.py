"""A plain ViT classifier with one class token (timm's `VisionTransformer` with `global_pool="token"`: the
class token's final output through one Linear head) in Flax, and the pair of a random tiny timm classifier
and the same network here, for the tests of what works on any ViT classifier (GETAM, TransMix)."""
from __future__ import annotations

import flax.linen as nn
import jax

from jaxseg.models.vit import ViT

# 3 blocks of width 64 and 4 heads, patch 8 on 32 px images: a 4 x 4 grid.
TINY = dict(depth=3, embed_dim=64, num_heads=4, img_size=32, patch_size=8)


class ViTClassifier(nn.Module):
    encoder: dict
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        tokens, _ = ViT(**self.encoder, name="encoder")(images)
        return nn.Dense(self.num_classes, name="head")(tokens[:, 0])


def random_timm_classifier(num_classes: int, seed: int = 0):
    """(timm model, `ViTClassifier`, its params): the same random DeiT-style classifier twice."""
    import torch

    from jaxseg.convert import from_timm
    from jaxseg.testing.references.timm_vit import random_timm_vit

    torch_model = random_timm_vit("vit_small_patch16_224", TINY, seed=seed)
    torch.manual_seed(seed + 1)
    torch_model.head = torch.nn.Linear(TINY["embed_dim"], num_classes)
    config, params = from_timm(torch_model.state_dict(), num_heads=TINY["num_heads"])
    head = {"kernel": torch_model.head.weight.detach().numpy().T.copy(),
            "bias": torch_model.head.bias.detach().numpy().copy()}
    return torch_model, ViTClassifier(config, num_classes), {"encoder": params, "head": head}

