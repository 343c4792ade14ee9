"""Segmenter (WeakTr stage 2) against the PyTorch reference of the official `Segmenter` / `MultiSegmenter`
forward with its `MaskTransformer` / `MultiMaskTransformer` decoder (`jaxseg/testing/references/segmenter.py`,
written from hustvl/WeakTr `OnlineRetraining/segm/model/{segmenter,decoder}.py`) over a timm encoder (timm's
LayerNorm eps and position-embedding resize), converted by `from_official_segmenter`. Random weights, CPU,
float32, tolerance 1e-5. Official encoders, checkpoint files and the linear decoder: tests/test_convert_segmenter.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.convert import from_official_segmenter
from jaxseg.models.segmenter import Segmenter, combine_readouts
from jaxseg.testing.references.segmenter import TorchMultiMaskTransformer, TorchSegmenter, randomize, torch_segmenter
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err

N_CLS, WIDTH, HEADS = 6, 64, 4
ENCODER = ("vit_small_patch16_224", dict(depth=2, embed_dim=WIDTH, num_heads=HEADS, img_size=32,
                                         patch_size=8, dynamic_img_size=True))


@pytest.fixture(scope="module")
def models():
    encoder = random_timm_vit(*ENCODER)
    decoder = randomize(TorchMultiMaskTransformer(N_CLS, WIDTH, HEADS), seed=1)
    config, params = from_official_segmenter(TorchSegmenter(encoder, decoder).state_dict(), num_heads=HEADS,
                                             decoder_heads=HEADS, layernorm_eps=1e-6, posemb_resize="timm")
    return encoder, decoder, Segmenter(**config), params


@pytest.mark.parametrize("size", [(32, 32), (37, 50)])  # (37, 50) is padded to (40, 56), then cropped
def test_readouts_match_reference(models, size):
    encoder, decoder, model, params = models
    images = np.random.default_rng(2).standard_normal((2, *size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_segmenter(encoder, decoder, torch.from_numpy(images).permute(0, 3, 1, 2))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    assert logits.shape == (2, 2, *size, N_CLS)
    errors = [rel_err(logits[i], expected[i].permute(0, 2, 3, 1).numpy()) for i in range(2)]
    print(size, errors)
    assert max(errors) <= 1e-5
    # WeakTr's inference score: 0.8 * softmax(read-out 1) + softmax(read-out 2).
    score = 0.8 * torch.softmax(expected[0], 1) + torch.softmax(expected[1], 1)
    assert rel_err(combine_readouts(logits), score.permute(0, 2, 3, 1).numpy()) <= 1e-5


def test_linear_decoder_and_bad_configs():
    encoder_config = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(2, 2))
    model = Segmenter(encoder=encoder_config, num_classes=3, decoder="linear")
    images = jnp.zeros((1, 20, 16, 3))
    variables = model.init(jax.random.key(0), images)
    assert model.apply(variables, images).shape == (1, 1, 20, 16, 3)
    with pytest.raises(ValueError, match="decoder must be one of"):
        Segmenter(encoder=encoder_config, num_classes=3, decoder="mlp").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="final_norm=True"):
        Segmenter(encoder=dict(encoder_config, final_norm=False), num_classes=3).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="2 weights for 1 read-outs"):
        combine_readouts(model.apply(variables, images))
