"""GETAM's gradient-weighted attention maps (`jaxseg.wsss.gradient_attention`, through the attention taps of
`jaxseg.models.vit_taps`) against a PyTorch reference of the official code (`jaxseg/testing/references/
getam.py`: weixuansun/GETAM's attention hooks and generate_cam_2) on a timm ViT classifier and on the WeakTr
reference, random weights, CPU, float32, within 1e-5 relative; and WeakTr's CAM predictor with
cam_kind="gradient_attention" against the same reference through the official CAM engine's steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.convert import from_official_weaktr
from jaxseg.errors import UserError
from jaxseg.methods.weaktr import CamPredictor
from jaxseg.models.vit import ViT
from jaxseg.models.vit_taps import tap_attention
from jaxseg.models.weaktr import WeakTr
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD
from jaxseg.testing.references.getam import getam_maps
from jaxseg.testing.references.timm_vit import rel_err
from jaxseg.testing.references.weaktr import TINY, random_torch_weaktr
from jaxseg.testing.vit_classifier import random_timm_classifier
from jaxseg.visualize import PredictionWriter
from jaxseg.wsss.gradient_attention import gradient_attention

C, HEADS = TINY["num_classes"], TINY["num_heads"]


@pytest.fixture(scope="module")
def weaktr_pair():
    torch_model = random_torch_weaktr()
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=HEADS)
    return torch_model, WeakTr(**config), params


def test_timm_classifier_matches_official():
    """A plain ViT classifier: every class reads the one class token's row; blocks from start_layer 1."""
    torch_model, model, params = random_timm_classifier(3)
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    expected = getam_maps(torch_model, torch_model, images, [0, 0, 0], 1, start_layer=1)
    maps = jax.jit(lambda p, x: gradient_attention(lambda: model.apply({"params": p}, x), [0, 0, 0], 1, 1))(
        params, images)
    print("timm classifier", rel_err(maps, expected))
    assert rel_err(maps, expected) <= 1e-5
    assert (expected > 0).mean() > 0.5  # not a map of zeros


@pytest.mark.parametrize("score", ["cls_logits", "coarse_logits"])
def test_weaktr_matches_official(weaktr_pair, score):
    """WeakTr: class c reads its own class token's row, for the class-token or the conv head's logits, on a
    non-square 6 x 4 grid."""
    torch_model, model, params = weaktr_pair
    images = np.random.default_rng(2).standard_normal((2, 48, 32, 3)).astype(np.float32)
    expected = getam_maps(lambda x: torch_model(x)[score], torch_model, images, list(range(C)), C)
    maps = jax.jit(lambda p, x: gradient_attention(lambda: model.apply({"params": p}, x)[score], range(C), C))(
        params, images)
    print(score, rel_err(maps, expected))
    assert rel_err(maps, expected) <= 1e-5
    assert (expected > 0).mean() > 0.5


def test_taps_leave_the_model_as_it_is():
    """The tapped attention is the ViT's own (return_attention), the outputs do not change, a zero
    perturbation changes nothing, and a rematerialised ViT is refused."""
    vit = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, posemb_grid=(4, 4))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = vit.init(jax.random.key(0), images)

    @jax.jit
    def run(variables, images):
        plain = vit.apply(variables, images, return_attention=True)
        tapped, taps = tap_attention(lambda: vit.apply(variables, images, return_attention=True))
        zeros = [jnp.zeros_like(tap["values"]) for tap in taps]
        perturbed, _ = tap_attention(lambda: vit.apply(variables, images), perturbations=zeros)
        _, only_last = tap_attention(lambda: vit.apply(variables, images), layers=(1,))
        return plain, tapped, taps, perturbed[0], only_last

    (tokens, inter), (tapped, _), taps, perturbed, only_last = run(variables, images)
    np.testing.assert_array_equal(tapped, tokens)
    for tap, probs in zip(taps, inter["attn_probs"], strict=True):
        np.testing.assert_array_equal(tap["probs"], probs)
        assert tap["values"].shape == (2, 17, 4, 8)
    np.testing.assert_allclose(perturbed, tokens, rtol=1e-5, atol=1e-6)
    assert len(only_last) == 1
    # Without return_attention the blocks run the fused attention kernel: its rounding reaches block 1.
    np.testing.assert_allclose(only_last[0]["probs"], inter["attn_probs"][1], rtol=1e-5, atol=1e-7)
    remat = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, posemb_grid=(4, 4), remat=True)
    with pytest.raises(UserError, match="remat"):
        jax.eval_shape(lambda: tap_attention(lambda: remat.apply(variables, images)))
    with pytest.raises(UserError, match="start_layer"):
        jax.eval_shape(lambda: gradient_attention(lambda: vit.apply(variables, images)[0][:, 0], range(32), 1,
                                                  start_layer=2))


def _reference_image_cams(torch_model, image, labels, start_layer):
    """The official CAM engine's steps at scale 1.0 with the GETAM map as the CAM: the image and its flip,
    ImageNet-normalised, each map bilinearly upsampled, masked by the labels, un-flipped, summed, min-max
    normalised per present class."""
    view = ((image.astype(np.float32) / 255 - np.asarray(IMAGENET_MEAN, np.float32))
            / np.asarray(IMAGENET_STD, np.float32))
    rows, cols = image.shape[0] // 8, image.shape[1] // 8
    total = 0
    for flip in (False, True):
        x = view[:, ::-1] if flip else view
        cams = getam_maps(lambda t: torch_model(t)["cls_logits"], torch_model, np.ascontiguousarray(x[None]),
                          list(range(C)), C, start_layer)
        cams = torch.nn.functional.interpolate(torch.from_numpy(cams.reshape(1, C, rows, cols)), size=image.shape[:2],
                                               mode="bilinear", align_corners=False)[0].numpy() * labels[:, None, None]
        total = total + (cams[..., ::-1] if flip else cams)
    low, high = total.min((1, 2), keepdims=True), total.max((1, 2), keepdims=True)
    return np.where(labels[:, None, None] > 0, (total - low) / (high - low + 1e-8), 0.0)


def test_predictor_cams_match_reference_and_draw(weaktr_pair, tmp_path):
    """cam_kind="gradient_attention" gives the CAMs of the official engine's steps over the GETAM maps of
    each class token's row (a 40 x 56 image: a 5 x 7 grid), and the prediction writer draws them."""
    torch_model, model, params = weaktr_pair
    image = np.random.default_rng(4).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    labels = np.array([1, 0, 1, 1, 0], np.float32)
    predictor = CamPredictor(model, C, "wsss", scales=(1.0,), cam_kind="gradient_attention", refine=False,
                             gradient_start_layer=1)
    example = {"image": image, "labels": labels, "semantic": np.zeros((40, 56, 1), np.uint8)}
    prepared = jax.tree_util.tree_map(lambda x: x[None], predictor.prepare(example))
    out = jax.jit(predictor.predict)(params, prepared)
    expected = _reference_image_cams(torch_model, image, labels, 1)
    print("predictor", rel_err(out["cams"][0], expected))
    assert rel_err(out["cams"][0], expected) <= 1e-5
    prediction = predictor.finish(jax.tree_util.tree_map(lambda x: np.asarray(x[0]), out), example)
    PredictionWriter(tmp_path)(0, example, prediction)
    assert sorted(p.name.rsplit("_cam_", 1)[1] for p in tmp_path.glob("*_cam_*.png")) == ["0.png", "2.png", "3.png"]
    with pytest.raises(UserError, match="gradient_start_layer"):
        CamPredictor(model, C, "wsss", cam_kind="gradient_attention", gradient_start_layer=2)
    with pytest.raises(UserError, match="gradient_score"):
        CamPredictor(model, C, "wsss", cam_kind="gradient_attention", gradient_score="fine")
