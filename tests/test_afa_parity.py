"""AFA against the PyTorch reference written from the official code (`jaxseg/testing/references/afa.py`:
rulixiang/afa `wetr/PAR.py`, `utils/camutils.py`, `utils/losses.py`, `scripts/dist_train_voc.py`, the heads
on a timm ViT as in rulixiang/ToCo), random weights, CPU, float32. Tolerances: 1e-5 relative to the largest
reference value for forward maps and losses, 1e-4 for gradients; label maps must agree on every pixel but a
few float ties (measured: all of them). PAR on its own refines the CAMs of WeakTr's CAM predictor.
"""
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxseg.data.datasets import DataConfig
from jaxseg.losses.afa import affinity_labels, affinity_loss, balanced_cross_entropy
from jaxseg.losses.multilabel import multilabel_soft_margin
from jaxseg.methods.afa import AfaMethod, AfaOptimizer, RandomWalkPredictor, poly_warmup
from jaxseg.methods.afa.cams import multiscale_cams
from jaxseg.methods.weaktr import CamPredictor
from jaxseg.models.afa import Afa
from jaxseg.models.weaktr import WeakTr
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import resize
from jaxseg.testing.references import afa as ref
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err
from jaxseg.wsss.cam import normalize_cams, pseudo_label
from jaxseg.wsss.par import par, par_pseudo_labels
from jaxseg.wsss.random_walk import propagate_cams, radius_mask, random_walk_pseudo_labels

RNG = np.random.default_rng(0)
C = 3  # foreground classes
LABELS = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
SMALL_PAR = dict(dilations=(1, 2, 4), num_iter=3)


def _nchw(x):
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def _rgb(height, width, seed=0):
    """Smooth colour fields with noise in [0, 1]: PAR's affinities need structure to get right."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
    base = 0.5 + 0.35 * np.stack([np.sin(rows + cols), np.cos(2 * rows), np.sin(3 * cols)], -1)
    return np.clip(base[None] + rng.normal(0, 0.08, (2, height, width, 3)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("cam_size,settings", [((8, 10), {}), ((32, 40), SMALL_PAR)])
def test_par_matches_reference(cam_size, settings):
    """Official settings (dilations up to 24 on a 32 x 40 image, CAMs upsampled with align_corners) and a
    smaller set on CAMs at the image size. Measured: 1.8e-6 and 6.4e-7."""
    images = _rgb(32, 40)
    cams = RNG.random((2, C, *cam_size)).astype(np.float32)
    torch_par = ref.TorchPAR(**{"dilations": (1, 2, 4, 8, 12, 24), "num_iter": 10, **settings})
    with torch.no_grad():
        expected = torch_par(_nchw(images), torch.from_numpy(cams)).numpy()
    error = rel_err(jax.jit(lambda i, c: par(i, c, **settings))(images, cams), expected)
    print(cam_size, error)
    assert error <= 1e-5


def _boxes(valid):
    """[top, bottom, left, right] of each image's valid box."""
    out = []
    for mask in valid:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        out.append([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1])
    return out


def test_par_pseudo_labels_match_reference():
    """refine_cams_with_bkg_v2: both background bands, the softmax over the present keys, PAR at half
    resolution, the ignore band and the padding outside the image box."""
    images = _rgb(32, 40, seed=1)
    cams = RNG.random((2, C, 32, 40)).astype(np.float32)
    cams[..., :20] **= 4  # low enough on the left for the background to win
    valid = np.zeros((2, 32, 40), bool)
    valid[0], valid[1, 4:30, 6:36] = True, True
    with torch.no_grad():
        expected = ref.par_pseudo_labels(ref.TorchPAR(), _nchw(images), torch.from_numpy(cams),
                                         torch.from_numpy(LABELS), _boxes(valid), 0.35, 0.55).numpy()
    labels = jax.jit(lambda i, c, y, v: par_pseudo_labels(i, c, y, valid=v))(images, cams, LABELS, valid)
    agree = (np.asarray(labels) == expected).mean()
    print("agreement", agree, np.unique(expected, return_counts=True))
    assert agree >= 0.999 and {0, 255} <= set(np.unique(expected).tolist())


def test_random_walk_matches_reference():
    """The radius mask, the transition matrix and the propagation with a background plane (absent classes
    0), and the random-walk labels (propagation at both thresholds, PAR, joined bands) on full boxes.
    Measured: propagation <= 1e-6."""
    grid = (5, 6)
    mask = radius_mask(grid, 2)
    np.testing.assert_array_equal(mask, ref.radius_mask(*grid, 2).astype(bool))
    cams = RNG.random((2, C, *grid)).astype(np.float32)
    affinity = RNG.random((2, 30, 30)).astype(np.float32)
    for background in (0.35, 0.55):
        expected = ref.propagate_cams(torch.from_numpy(cams), torch.from_numpy(affinity), mask,
                                      torch.from_numpy(LABELS), background).numpy()
        walked = jax.jit(lambda c, a, y, b=background: propagate_cams(c, a, y, b, mask=mask))(cams, affinity, LABELS)
        print("propagation", background, rel_err(walked, expected))
        assert rel_err(walked, expected) <= 1e-5
    absent = np.concatenate([np.ones((2, 1)), LABELS], 1) == 0
    assert np.all(np.asarray(walked)[absent] == 0)

    # An object on the right half (its class's CAM high there) and an affinity that keeps to each half.
    images = _rgb(32, 48, seed=2)
    full_cams = (0.3 * RNG.random((2, C, 32, 48))).astype(np.float32)
    full_cams[0, 0, :, 24:] = full_cams[1, 1, :, 24:] = 1.0
    right = np.arange(30) % 6 >= 3
    halves = np.where(right[:, None] == right[None], 0.9, 0.05) + 0.1 * RNG.random((2, 30, 30))
    halves = halves.astype(np.float32)
    valid = np.ones((2, 32, 48), bool)
    with torch.no_grad():
        expected = ref.random_walk_labels(ref.TorchPAR(), _nchw(images), torch.from_numpy(full_cams),
                                          torch.from_numpy(halves), radius_mask(grid, 2),
                                          torch.from_numpy(LABELS), _boxes(valid), grid, 0.35, 0.55).numpy()
    labels = jax.jit(lambda i, c, y, a: random_walk_pseudo_labels(i, c, y, a, grid, radius=2, valid=valid))(
        images, full_cams, LABELS, halves)
    agree = (np.asarray(labels) == expected).mean()
    print("random-walk label agreement", agree, np.unique(expected, return_counts=True))
    assert agree >= 0.999 and len(np.unique(expected)) >= 3


WIDTH, HEADS, DEPTH, PATCH = 32, 2, 2, 8


@pytest.fixture(scope="module")
def afa_pair():
    """A timm ViT (class token, final norm) with AFA's heads, its attention damped so that the affinity's
    sigmoid is not saturated (gradients then reach the attention), and the converted jaxseg model."""
    encoder = random_timm_vit("vit_small_patch16_224", dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS,
                                                            img_size=32, patch_size=PATCH, dynamic_img_size=True))
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.qkv.weight.mul_(0.3)
    torch.manual_seed(1)
    torch_model = ref.TorchAfa(encoder, C + 1, affinity_layers=DEPTH, decoder_width=16, dilation=2).eval()
    with torch.no_grad():
        torch_model.attn_proj.weight.mul_(0.1)
    config, params = ref.jaxseg_params(torch_model)
    model = Afa(encoder=config, num_classes=C, affinity_layers=DEPTH, decoder_width=16, decoder_dilation=2)
    return torch_model, model, params


IMAGES = RNG.standard_normal((2, 32, 40, 3)).astype(np.float32)  # 4 x 5 patch grid


def test_model_forward_matches_reference(afa_pair):
    """Class logits, CAMs, segmentation logits and the affinity of all blocks' raw attention logits, over a
    timm ViT converted with `from_timm`. Measured: <= 2e-6."""
    torch_model, model, params = afa_pair
    with torch.no_grad():
        cls, seg, affinity = torch_model(_nchw(IMAGES))
        cams, cam_affinity = torch_model(_nchw(IMAGES), cam_only=True)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, IMAGES)
    errors = {"cls": rel_err(out["cls_logits"], cls.numpy()), "cams": rel_err(out["cams"], cams.numpy()),
              "seg": rel_err(out["seg_logits"], seg.permute(0, 2, 3, 1).numpy()),
              "affinity": rel_err(out["affinity"], affinity.numpy())}
    print(errors, "affinity range", float(affinity.min()), float(affinity.max()))
    assert max(errors.values()) <= 1e-5, errors
    assert 0.01 < float(affinity.min()) and float(affinity.max()) < 0.99  # not saturated: gradients flow
    only_cams, only_affinity = jax.jit(lambda p, x: model.apply({"params": p}, x, affinity=True, method=Afa.cams))(
        params, IMAGES)
    assert rel_err(only_cams, cams.numpy()) <= 1e-5 and rel_err(only_affinity, cam_affinity.numpy()) <= 1e-5
    # One block's maps: the head reads the last ones.
    last = Afa(encoder=model.encoder, num_classes=C, affinity_layers=1, decoder_width=16, decoder_dilation=2)
    torch_last = ref.TorchAfa(torch_model.encoder, C + 1, affinity_layers=1, decoder_width=16, dilation=2)
    torch_last.load_state_dict({k: v for k, v in torch_model.state_dict().items() if not k.startswith("attn_proj")},
                               strict=False)
    _, last_params = ref.jaxseg_params(torch_last)
    with torch.no_grad():
        expected = torch_last(_nchw(IMAGES))[2].numpy()
    last_error = rel_err(jax.jit(last.apply)({"params": last_params}, IMAGES)["affinity"], expected)
    print("last block's affinity", last_error)
    assert last_error <= 1e-5


def test_losses_and_gradients_match_reference(afa_pair):
    """The joint loss on fixed pseudo-labels (soft margin + 0.1 balanced CE + 0.1 affinity loss with the
    labels within a radius) and its gradient for every parameter (encoder, classifier, affinity head,
    LargeFOV). Measured: loss terms <= 1e-7, gradients <= 1.5e-5 (the worst leaf)."""
    torch_model, model, params = afa_pair
    pseudo = RNG.integers(0, C + 1, (2, 32, 40))
    pseudo[:, :4] = 255
    grid, mask = (4, 5), radius_mask((4, 5), 2)
    targets = affinity_labels(jnp.asarray(pseudo), grid, mask)
    expected_targets = ref.affinity_labels(torch.from_numpy(pseudo), PATCH, mask)
    np.testing.assert_array_equal(np.asarray(targets), expected_targets.numpy())
    assert {0, 1, 255} <= set(np.unique(expected_targets.numpy()).tolist())

    torch_model.zero_grad()
    cls, seg, affinity = torch_model(_nchw(IMAGES))
    seg = F.interpolate(seg, size=(32, 40), mode="bilinear", align_corners=False)
    terms = {"cls": F.multilabel_soft_margin_loss(cls, torch.from_numpy(LABELS)),
             "seg": ref.split_cross_entropy(seg, torch.from_numpy(pseudo)),
             "aff": ref.affinity_loss(affinity, expected_targets)}
    (terms["cls"] + 0.1 * terms["seg"] + 0.1 * terms["aff"]).backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in torch_model.named_parameters()}
    _, expected_grads = ref.jaxseg_tree({**{k: v.detach() for k, v in torch_model.state_dict().items()}, **grads},
                                        HEADS)

    def loss(p):
        out = model.apply({"params": p}, IMAGES)
        seg_logits = resize(out["seg_logits"], (32, 40))
        values = {"cls": multilabel_soft_margin(out["cls_logits"], LABELS),
                  "seg": balanced_cross_entropy(seg_logits, jnp.asarray(pseudo)),
                  "aff": affinity_loss(out["affinity"], targets)[0]}
        return values["cls"] + 0.1 * values["seg"] + 0.1 * values["aff"], values

    (_, values), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    errors = {k: rel_err(values[k], terms[k].item()) for k in terms}
    print(errors, {k: v.item() for k, v in terms.items()})
    assert max(errors.values()) <= 1e-5, errors
    flat = jax.tree_util.tree_leaves_with_path(grads)
    expected_flat = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    grad_errors = {jax.tree_util.keystr(k): rel_err(v, expected_flat[k]) for k, v in flat}
    print(max(grad_errors.values()))
    assert max(grad_errors.values()) <= 1e-4, sorted(grad_errors.items(), key=lambda kv: -kv[1])[:3]


def test_multiscale_cams_match_reference(afa_pair):
    """multi_scale_cam_with_aff_mat at scales (1, 0.5, 1.5) with flips: the normalised CAMs and the largest
    scale's affinity. Measured: <= 3e-6."""
    torch_model, model, params = afa_pair
    images = RNG.standard_normal((2, 32, 32, 3)).astype(np.float32)
    expected_cams, expected_affinity = ref.multi_scale_cams(torch_model, _nchw(images), (1.0, 0.5, 1.5))

    def cam_fn(views, with_affinity):
        return model.apply({"params": params}, views, affinity=with_affinity, method=Afa.cams)

    cams, affinity = jax.jit(lambda x, y: multiscale_cams(cam_fn, x, y, (1.0, 0.5, 1.5), PATCH))(images, LABELS)
    expected_cams = expected_cams.numpy() * LABELS[:, :, None, None]  # absent classes: 0 here
    assert affinity.shape == (2, 36, 36)
    errors = rel_err(cams, expected_cams), rel_err(affinity, expected_affinity.numpy())
    print(errors)
    assert max(errors) <= 1e-5


def test_schedule_is_the_official_poly_warmup():
    """PolyWarmupAdamW's lr at every step of a short run (warm-up 5 of 20, ratio 1e-6, power 1)."""
    schedule = jax.jit(poly_warmup(6e-5, 20, 5, warmup_ratio=1e-6, power=1.0))
    for step in range(20):
        mult = 1 - (1 - step / 5) * (1 - 1e-6) if step < 5 else (1 - step / 20) ** 1.0
        np.testing.assert_allclose(float(schedule(step)), 6e-5 * mult, rtol=1e-6)


def test_par_refines_weaktr_cams():
    """PAR on its own: the CAMs of WeakTr's CAM predictor (`jaxseg.methods.weaktr.CamPredictor`, a tiny
    random WeakTr) refined against their image as the docs/afa.md example does; equal to the reference
    PAR, and edge-aware: on an image of two flat colour halves a CAM that blurs across the edge comes back
    sharper (the difference of the halves' means grows)."""
    network = WeakTr(encoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4),
                                  num_cls_tokens=C, final_norm=False, posemb_resize="dino"), num_classes=C,
                     reduction=2, feat_reduction=2)
    shapes = nn.meta.unbox(jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    params = jax.tree_util.tree_map(lambda s: RNG.normal(0, 0.3, s.shape).astype(s.dtype), shapes)  # no init compile
    predictor = CamPredictor(network, C, "wsss", scales=(1.0,), refine=False)
    image = (_rgb(32, 40, seed=3)[0] * 255).astype(np.uint8)
    example = {"image": image, "labels": np.array([1, 1, 0], np.float32)}
    batch = jax.tree_util.tree_map(lambda x: x[None], predictor.prepare(example))
    cams = jax.jit(predictor.predict)(params, batch)["cams"]  # (1, C, H, W), normalised, absent 0

    refine = jax.jit(par)
    refined = refine(image[None] / 255, cams)
    with torch.no_grad():
        expected = ref.TorchPAR()(_nchw(image[None] / 255).float(), torch.from_numpy(np.array(cams))).numpy()
    error = rel_err(refined, expected)
    print("PAR of WeakTr's CAMs", error)
    assert error <= 1e-5
    relabelled = pseudo_label(normalize_cams(refined[0], example["labels"]), example["labels"], 0.43)
    assert relabelled.shape == image.shape[:2]

    halves = np.zeros((1, 32, 40, 3), np.float32)
    halves[:, :, 20:] = (0.1, 0.2, 0.9)
    halves[:, :, :20] = (0.9, 0.3, 0.1)
    blurred = np.broadcast_to(np.clip((np.arange(40) - 10) / 20, 0, 1), (1, C, 32, 40)).astype(np.float32)
    sharp = np.asarray(refine(halves, blurred))[0, 0] / 1.01 ** 10  # the weights sum to 1 + w2
    before = blurred[0, 0, :, 20:].mean() - blurred[0, 0, :, :20].mean()
    assert sharp[:, 20:].mean() - sharp[:, :20].mean() > before + 0.1, (before, sharp.mean(0))


def test_random_walk_predictor_matches_official_validation(afa_pair):
    """The "random_walk" predictor against the official validation's "aff cams": multi-scale CAMs resized to
    the patch grid, propagated with the scale-1 affinity within the radius at background 0.35, resized back,
    argmax over the background and the present classes."""
    torch_model, model, params = afa_pair
    stub = SimpleNamespace(patch=PATCH, num_classes=C,
                           cam_fn=lambda p: lambda views, with_affinity: model.apply(
                               {"params": p}, views, affinity=with_affinity, method=Afa.cams))
    predictor = RandomWalkPredictor(stub, scales=(1.0, 0.5, 1.5), background=0.35, radius=2)
    images = (_rgb(32, 32, seed=4) * 255).astype(np.uint8)
    semantic = jax.jit(predictor.predict)(params, {"image": images, "labels": LABELS})["semantic"]

    inputs = _nchw(np.asarray(normalize(images / 255), np.float32))
    cams, _ = ref.multi_scale_cams(torch_model, inputs, (1.0, 0.5, 1.5))
    with torch.no_grad():
        _, affinity = torch_model(inputs, cam_only=True)
    walked = ref.propagate_cams(F.interpolate(cams, size=(4, 4), mode="bilinear", align_corners=False), affinity,
                                radius_mask((4, 4), 2), torch.from_numpy(LABELS), 0.35)
    expected = F.interpolate(walked, size=(32, 32), mode="bilinear", align_corners=False).argmax(1).numpy()
    agree = (np.asarray(semantic) == expected).mean()
    print("agreement", agree, np.unique(expected, return_counts=True))
    assert agree >= 0.999 and len(np.unique(expected)) >= 3


def test_training_step_phases_and_augmentation():
    """The method's loss under jit on a tiny network: classification alone up to 10% of the run (segmentation
    and affinity terms 0, no gradient to their heads), then all three terms on the PAR labels, and from 30%
    the random walk's segmentation labels (only the segmentation term changes). The augmentation: a
    rescaled image on a black canvas, cropped, its valid box where the image is."""
    method = AfaMethod(model=dict(encoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
                                               posemb_grid=(2, 2)), num_classes=C, decoder_width=8, decoder_dilation=1),
                       optimizer=AfaOptimizer(warmup_steps=2), total_steps=10, batch_size=2,
                       data=DataConfig(name="jaxseg_scenes"), crop_size=16, scale_range=(0.5, 0.5), cam_scales=(1.0,),
                       par_dilations=(1, 2), par_iterations=2, radius=1)
    rng = np.random.default_rng(0)
    examples = [{"image": (_rgb(24, 20, seed=s)[0] * 255).astype(np.uint8),
                 "labels": np.array([1, 0, 1, 1], np.float32)} for s in range(2)]
    batch = [method.train_transform(e, rng) for e in examples]
    assert batch[0]["image"].shape == (16, 16, 3) and batch[0]["labels"].tolist() == [1, 0, 1]
    assert [b["valid"].sum() for b in batch] == [12 * 10] * 2  # the 12 x 10 rescaled image inside the crop
    batch = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
    np.testing.assert_allclose(batch["image"][~batch["valid"]], np.broadcast_to(normalize(np.zeros(3)), (2 * 136, 3)),
                               rtol=1e-6)  # black padding

    shapes = nn.meta.unbox(jax.eval_shape(method.init_params, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    step_fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
    terms = {}
    for step in (0, 2, 5):
        (loss, terms[step]), grads = step_fn(params, batch, jax.random.key(1), step)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in terms[step].values()), terms
        head = float(jnp.abs(grads["affinity"]["kernel"]).max() + jnp.abs(grads["decoder"]["conv8"]["kernel"]).max())
        if step == 0:
            assert terms[0]["seg"] == 0 and terms[0]["aff"] == 0 and head == 0 and float(loss) == float(terms[0]["cls"])
        else:
            assert terms[step]["seg"] > 0 and terms[step]["aff"] > 0 and head > 0, terms
            assert 136 / 256 < terms[step]["ignored"] < 1, terms  # the padding and some uncertain pixels
    assert terms[5]["aff"] == terms[2]["aff"] and terms[5]["seg"] != terms[2]["seg"], terms
