"""MAE (`jaxseg.models.mae` + `jaxseg.losses.mae`) against the PyTorch reference of the official
`MaskedAutoencoderViT` (`jaxseg/testing/references/mae.py`, written from facebookresearch/mae
`models_mae.py`): random weights, tiny sizes, CPU, float32, both given the same masking noise. Loss and
predicted pixels within 1e-5 relative, gradients of every trained parameter within 1e-4."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.losses.mae import mae_loss, num_kept, patchify, random_masking, unpatchify
from jaxseg.models.mae import MAE
from jaxseg.ops.posemb import sincos_posemb
from jaxseg.testing.references.mae import TorchMAE, jax_params, randomize, sincos_2d
from jaxseg.testing.references.timm_vit import rel_err

WIDTH, HEADS, DECODER, DECODER_HEADS, PATCH = 64, 4, 32, 4, 8


def _models(size, norm_pix):
    reference = randomize(TorchMAE(img_size=size, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                                   decoder_embed_dim=DECODER, decoder_depth=2, decoder_num_heads=DECODER_HEADS,
                                   norm_pix_loss=norm_pix))
    grid = size // PATCH
    model = MAE(encoder=dict(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=4 * WIDTH, patch_size=PATCH,
                             posemb_grid=(grid, grid)),
                decoder_width=DECODER, decoder_depth=2, decoder_heads=DECODER_HEADS, decoder_mlp_dim=4 * DECODER)
    return reference, model


@pytest.mark.parametrize("size,mask_ratio,norm_pix", [(32, 0.75, True), (48, 0.6, False)])
def test_loss_predictions_and_gradients_match_reference(size, mask_ratio, norm_pix):
    reference, model = _models(size, norm_pix)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, size, size, 3)).astype(np.float32)
    noise = rng.uniform(size=(3, (size // PATCH) ** 2)).astype(np.float32)

    torch_images = torch.from_numpy(images).permute(0, 3, 1, 2)
    loss, pred, mask = reference(torch_images, torch.from_numpy(noise), mask_ratio)
    loss.backward()
    grads = {name: (p.grad if p.requires_grad else torch.zeros_like(p)) for name, p in reference.named_parameters()}

    params = jax_params(reference.state_dict(), HEADS, DECODER_HEADS)
    keep = num_kept(noise.shape[1], mask_ratio)
    ids_keep, ids_restore, jax_mask = random_masking(jnp.asarray(noise), keep)
    np.testing.assert_array_equal(jax_mask, mask.numpy())
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids_keep, ids_restore))["params"]
    assert jax.tree_util.tree_structure(flax.linen.unbox(abstract)) == jax.tree_util.tree_structure(params)

    def loss_fn(p):
        predicted = model.apply({"params": p}, images, ids_keep, ids_restore)
        return mae_loss(predicted, images, jax_mask, PATCH, norm_pix), predicted

    (jax_loss, jax_pred), jax_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert rel_err(jax_loss, loss.item()) <= 1e-5
    assert rel_err(jax_pred, pred.detach().numpy()) <= 1e-5
    expected = flax.traverse_util.flatten_dict(jax_params(grads, HEADS, DECODER_HEADS), sep="/")
    actual = flax.traverse_util.flatten_dict(jax_grads, sep="/")
    # The key bias adds the same logit to every key of a query: its exact gradient is 0 (rounding noise
    # in both), so it is checked against the gradients' scale. The position embedding is fixed in MAE.
    scale = max(float(np.abs(g).max()) for g in expected.values())
    assert all(np.abs(actual[n]).max() <= 1e-5 * scale for n in actual if n.endswith("key/bias"))
    errors = {name: rel_err(g, expected[name]) for name, g in actual.items()
              if name != "encoder/pos_embed" and not name.endswith("key/bias")}
    print(size, mask_ratio, norm_pix, rel_err(jax_loss, loss.item()), max(errors.values()))
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_sincos_posemb_is_the_official_table():
    for width, grid in ((64, 4), (192, 8), (32, 1)):
        np.testing.assert_allclose(sincos_posemb(width, (grid, grid), 1)[0], sincos_2d(width, grid), rtol=0, atol=1e-7)
    rows_first = sincos_posemb(16, (2, 3))[0].reshape(2, 3, 16)  # columns in the first half, rows in the second
    np.testing.assert_array_equal(rows_first[0, :, :8], rows_first[1, :, :8])
    np.testing.assert_array_equal(rows_first[:, 0, 8:], rows_first[:, 2, 8:])


def test_patchify_round_trip_and_masking_shapes():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 24, 3)), jnp.float32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    np.testing.assert_array_equal(patches[0, 1], np.asarray(images[0, :8, 8:16]).reshape(-1))
    np.testing.assert_array_equal(unpatchify(patches, (2, 3), 8), images)
    ids_keep, ids_restore, mask = random_masking(jax.random.uniform(jax.random.key(0), (2, 6)), 2)
    assert ids_keep.shape == (2, 2) and mask.sum() == 8
    assert all(mask[b, ids_keep[b]].sum() == 0 for b in range(2))
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(64, 1.0)
