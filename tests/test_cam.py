"""CAM inference against the official engine (hustvl/WeakTr `datasets.py` + `engine.py`, as the PyTorch
reference `official_image_cams` on the reference model), Pillow's bicubic resize, pseudo-labels and the
threshold sweep against direct numpy computations."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from jaxseg.convert import from_official_weaktr
from jaxseg.methods.weaktr import CamPredictor
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.weaktr import WeakTr, select_cam
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import pil_resize, resize
from jaxseg.testing.references.timm_vit import rel_err
from jaxseg.testing.references.weaktr import TINY, official_image_cams, random_torch_weaktr
from jaxseg.wsss.cam import multiscale_cams, normalize_cams, pseudo_label, refine
from jaxseg.wsss.par import par

RNG = np.random.default_rng(0)


def _uint8_image(height, width, seed=0):
    """A smooth colour field with noise, so that resampling has structure to get right."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
    base = 127 + 100 * np.stack([np.sin(rows + cols), np.cos(2 * rows), np.sin(3 * cols)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size,out", [((77, 77), (92, 92)), ((77, 77), (62, 62)), ((375, 500), (450, 600)),
                                      ((375, 500), (300, 400)), ((13, 7), (5, 20)), ((100, 64), (33, 200)),
                                      ((64, 100), (200, 33)), ((9, 9), (9, 9)), ((5, 3), (1, 1))])
def test_pil_resize_is_pillows_bicubic(size, out):
    """Bit for bit, including strong downscales (wide kernels), mixed up/down scaling and both pass
    orders of Pillow 13 (vertical first when the height shrinks by over twice the width's pixels)."""
    image = _uint8_image(*size)
    image[:3] = 255  # saturated rows: the clipping of the negative lobes' overshoot
    expected = np.asarray(PIL.Image.fromarray(image).resize(out[::-1], resample=PIL.Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(jax.jit(pil_resize, static_argnums=1)(image, out)), expected)


def test_pil_resize_refuses_other_inputs():
    with pytest.raises(ValueError, match="uint8 images"):
        pil_resize(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match="both >= 1"):
        pil_resize(np.zeros((4, 4, 3), np.uint8), (0, 2))


# The reference model with 16 px patches (so that a 375 x 500 image stays cheap); its stored grid is 4 x 4.
OFFICIAL = dict(TINY, patch_size=16)


@pytest.fixture(scope="module")
def official_pair():
    torch_model = random_torch_weaktr(sizes=OFFICIAL)
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=OFFICIAL["num_heads"])
    model = WeakTr(**config)
    forward = jax.jit(lambda views: model.apply({"params": params}, views))
    return torch_model, forward


def _level_over_range(maps):
    """The largest ratio of a map's largest magnitude to its range (max - min): how much the min-max
    normalisation magnifies an error relative to the map's level."""
    return (np.abs(maps).max((1, 2)) / (maps.max((1, 2)) - maps.min((1, 2)))).max()


# 77 x 77: views of 77, 92 and 62 px, none a multiple of 16 (the 77 px view keeps the stored 4 x 4 grid);
# 70 x 77: a non-square view of the stored grid, which the DINO position embedding still resamples.
@pytest.mark.parametrize("size,scales", [((77, 77), (1.0, 1.2, 0.8)), ((375, 500), (1.0, 1.2, 0.8)),
                                         ((70, 77), (1.0,))])
def test_cams_match_the_official_engine(official_pair, size, scales):
    """Every CAM kind, refined or not, at the scales with flips, equals the official engine's on images
    whose views are not multiples of the patch size (the views are bit-identical, only float32 arithmetic
    differs). The summed maps agree to 1e-5 relative to their largest value (measured: <= 1.0e-6). The
    min-max normalisation divides by each map's range, which for the refined cross attention of random
    weights is down to 1/19 of its level, so the normalised CAMs get 1e-5 times that ratio (measured:
    <= 8.8e-6, with ratios up to 19)."""
    start = time.perf_counter()
    torch_model, forward = official_pair
    image = _uint8_image(*size, seed=size[0])
    labels = np.array([1, 0, 1, 0, 1], np.float32)
    present = labels > 0
    report = {}
    for (kind, refined), expected in official_image_cams(torch_model, image, labels, scales).items():
        def cam_fn(views, kind=kind, refined=refined):
            out = forward(views)
            return select_cam(out, kind), out["patch_attention"] if refined else None
        total = multiscale_cams(cam_fn, image, labels, OFFICIAL["patch_size"], scales)
        level = _level_over_range(expected["sum_cam"][present])
        errors = rel_err(total, expected["sum_cam"]), rel_err(normalize_cams(total, labels), expected["cams"])
        report[f"{kind}{'' if refined else ' unrefined'}"] = f"sum {errors[0]:.1e}, cams {errors[1]:.1e} (x{level:.0f})"
        assert errors[0] <= 1e-5 and errors[1] <= 1e-5 * level, (kind, refined, errors, level)
    print(size, scales, report, f"{time.perf_counter() - start:.1f} s")


def test_predictor_cam_kind_reaches_the_cams(official_pair):
    """The predictor's `cam_kind` setting picks the map inside its jitted program: the cross-attention
    CAMs of the predictor equal the official engine's `attention_type="cross"`."""
    torch_model, _ = official_pair
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=OFFICIAL["num_heads"])
    image, labels = _uint8_image(70, 77), np.array([0, 1, 1, 0, 0], np.float32)
    predictor = CamPredictor(WeakTr(**config), 5, "wsss", scales=(1.0,), cam_kind="cross")
    prepared = jax.tree_util.tree_map(lambda x: x[None], predictor.prepare({"image": image, "labels": labels}))
    out = jax.jit(predictor.predict)(params, prepared)
    expected = official_image_cams(torch_model, image, labels, (1.0,), attention_types=("cross",),
                                   patch_attn_refine=(True,))
    expected = expected["cross", True]
    assert rel_err(out["cams"][0], expected["cams"]) <= 1e-5 * _level_over_range(expected["sum_cam"][labels > 0])
    with pytest.raises(ValueError, match="cam_kind must be one of"):
        CamPredictor(WeakTr(**config), 5, "wsss", cam_kind="attention")


def test_predictor_par_refines_the_normalised_cams(official_pair):
    """`par=True`: the predictor's CAMs are its plain CAMs refined by PAR (`jaxseg.wsss.par`, tested against
    AFA's reference in tests/test_afa_parity.py) and normalised again, inside the same jitted program."""
    torch_model, _ = official_pair
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=OFFICIAL["num_heads"])
    image, labels = _uint8_image(40, 48), np.array([0, 1, 1, 0, 0], np.float32)
    outputs = {}
    for with_par in (False, True):
        predictor = CamPredictor(WeakTr(**config), 5, "wsss", scales=(1.0,), par=with_par)
        prepared = jax.tree_util.tree_map(lambda x: x[None], predictor.prepare({"image": image, "labels": labels}))
        outputs[with_par] = jax.jit(predictor.predict)(params, prepared)["cams"][0]
    expected = normalize_cams(par(jnp.asarray(image[None], jnp.float32) / 255, outputs[False][None])[0], labels)
    np.testing.assert_allclose(outputs[True], expected, rtol=1e-5, atol=1e-6)
    assert rel_err(outputs[True], outputs[False]) > 1e-2  # PAR moved them


def test_refine_is_the_patch_affinity_product():
    cam = RNG.random((2, 3, 4, 5)).astype(np.float32)
    affinity = RNG.random((2, 20, 20)).astype(np.float32)
    expected = np.stack([np.stack([affinity[b] @ cam[b, c].ravel() for c in range(3)]) for b in range(2)])
    np.testing.assert_allclose(refine(cam, affinity), expected.reshape(cam.shape), rtol=1e-5)


def _position_cam_fn(views):
    """A fake CAM network: class c responds to channel c of the view averaged per 8x8 patch (the pixels
    beyond whole patches dropped), and the patch affinity is the identity, so the refined CAM is that
    pooled map."""
    batch, height, width, _ = views.shape
    rows, cols = height // 8, width // 8
    pooled = views[:, :rows * 8, :cols * 8].reshape(batch, rows, 8, cols, 8, 3).mean((2, 4))
    cams = jnp.moveaxis(pooled, -1, 1)
    return cams, jnp.broadcast_to(jnp.eye(pooled.shape[1] * pooled.shape[2]), (batch,) + (cams[0, 0].size,) * 2)


def test_multiscale_cams_sum_scaled_and_flipped_passes():
    image = _uint8_image(35, 45)
    labels = np.array([1, 0, 1], np.float32)
    cams = multiscale_cams(_position_cam_fn, image, labels, 8, scales=(1.0,))
    view = normalize(image.astype(np.float32) / 255)
    single = resize(_position_cam_fn(view[None])[0][0], (35, 45), method="bilinear", axes=(1, 2))
    # The whole view is flipped, then the model drops the columns beyond whole patches: the flipped pass
    # sees columns 5..44 of the image where the plain one sees 0..39.
    flipped = resize(_position_cam_fn(view[None, :, ::-1])[0][0], (35, 45), method="bilinear",
                     axes=(1, 2))[:, :, ::-1]
    np.testing.assert_allclose(cams, (single + flipped) * labels[:, None, None], rtol=1e-5, atol=1e-6)
    assert not np.asarray(cams[1]).any()  # absent class zeroed
    # Flip symmetry at any size: the views of the mirrored image are those of the image, mirrored.
    mirrored = multiscale_cams(_position_cam_fn, image[:, ::-1], labels, 8, scales=(1.0, 1.3))
    np.testing.assert_allclose(mirrored, multiscale_cams(_position_cam_fn, image, labels, 8,
                                                         scales=(1.0, 1.3))[:, :, ::-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than one 8 px patch"):
        multiscale_cams(_position_cam_fn, image, labels, 8, scales=(0.1,))


def test_cam_function_without_patch_attention_skips_the_refinement():
    image = _uint8_image(32, 40)
    labels = np.array([1, 1, 0], np.float32)
    # The fake network's affinity is the identity: refining by it or not refining agree.
    unrefined = multiscale_cams(lambda views: (_position_cam_fn(views)[0], None), image, labels, 8, (1.0, 1.2))
    np.testing.assert_allclose(unrefined, multiscale_cams(_position_cam_fn, image, labels, 8, (1.0, 1.2)),
                               rtol=1e-6)


def test_normalisation_and_pseudo_labels():
    cams = RNG.random((3, 6, 7)).astype(np.float32) * 5
    labels = np.array([1, 0, 1])
    normalized = np.asarray(normalize_cams(cams, labels))
    for c in (0, 2):
        np.testing.assert_allclose(normalized[c], (cams[c] - cams[c].min()) / (cams[c].max() - cams[c].min()
                                                                               + 1e-8), rtol=1e-5)
    assert not normalized[1].any()
    label_map = np.asarray(pseudo_label(normalized, labels, 0.43))
    stacked = np.concatenate([np.full((1, 6, 7), 0.43), normalized[[0, 2]]])
    expected = np.array([0, 1, 3])[stacked.argmax(0)]
    np.testing.assert_array_equal(label_map, expected)
    assert set(np.unique(label_map)) <= {0, 1, 3}  # absent class 2 (label 2) never appears


def _add_image(metric, cam, label, gt):
    """Feeds one image to a CAM sweep accumulator as the evaluator does: its targets on the image's own
    canvas, its stats, and an update with a batch of one."""
    targets = metric.targets({"semantic": gt, "labels": label}, gt.shape)
    stats = metric.stats({"cams": jnp.asarray(cam)}, jax.tree_util.tree_map(jnp.asarray, targets))
    metric.update(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], stats))


def test_threshold_sweep_matches_direct_miou():
    cams = [np.array(normalize_cams(RNG.random((3, 8, 8)), [1, 1, 0])) for _ in range(4)]
    labels = [np.array([1, 1, 0])] * 4
    gts = [RNG.integers(0, 4, (8, 8)) for _ in range(4)]
    gts[0][0, :] = 255
    cams[1][0, 0, :] = 0.5  # ties with the background plane go to the background
    # One image without any present class: background everywhere.
    cams.append(np.zeros((3, 8, 8), np.float32))
    labels.append(np.zeros(3))
    gts.append(RNG.integers(0, 4, (8, 8)))
    sweep = CamSweepMetric(3, [0.3, 0.5])
    for cam, label, gt in zip(cams, labels, gts):
        _add_image(sweep, cam, label, gt)
    result = sweep.result()
    # Accumulators fed disjoint parts of the images (as hosts are) merge into the one fed them all.
    first, second = CamSweepMetric(3, [0.3, 0.5]), CamSweepMetric(3, [0.3, 0.5])
    for i, (cam, label, gt) in enumerate(zip(cams, labels, gts)):
        _add_image(first if i < 2 else second, cam, label, gt)
    first.merge(second)
    assert first.result() == result
    for i, t in enumerate((0.3, 0.5)):
        preds = [np.asarray(pseudo_label(cam, label, t)) for cam, label in zip(cams, labels)]
        ious = []
        for k in range(4):
            tp = sum(((p == k) & (g == k)).sum() for p, g in zip(preds, gts))
            fp = sum(((p == k) & (g != k) & (g != 255)).sum() for p, g in zip(preds, gts))
            fn = sum(((p != k) & (g == k)).sum() for p, g in zip(preds, gts))
            ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        np.testing.assert_allclose(result["cam_miou_curve"][i], np.nanmean(ious), rtol=1e-9)
    assert result["cam_miou"] == max(result["cam_miou_curve"])


def test_with_a_weaktr_network():
    encoder = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4),
                   num_cls_tokens=3, final_norm=False, posemb_resize="dino")
    model = WeakTr(encoder=encoder, num_classes=3, reduction=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]

    @jax.jit
    def cam_fn(views):
        out = model.apply({"params": params}, views)
        return out["fused_cam"], out["patch_attention"]

    image = _uint8_image(35, 45)
    cams = multiscale_cams(cam_fn, image, np.array([0, 1, 1]), 8)
    assert cams.shape == (3, 35, 45) and np.isfinite(np.asarray(cams)).all()
