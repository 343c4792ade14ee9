"""CAM inference, pseudo-labels and the threshold sweep against direct numpy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.weaktr import WeakTr
from jaxseg.ops.resize import resize
from jaxseg.wsss.cam import multiscale_cams, normalize_cams, pseudo_label, refine

RNG = np.random.default_rng(0)


def test_refine_is_the_patch_affinity_product():
    cam = RNG.random((2, 3, 4, 5)).astype(np.float32)
    affinity = RNG.random((2, 20, 20)).astype(np.float32)
    expected = np.stack([np.stack([affinity[b] @ cam[b, c].ravel() for c in range(3)]) for b in range(2)])
    np.testing.assert_allclose(refine(cam, affinity), expected.reshape(cam.shape), rtol=1e-5)


def _position_cam_fn(views):
    """A fake CAM network: class c responds to channel c of the image averaged per 8x8 patch, and the
    patch affinity is the identity, so the refined CAM is that pooled map."""
    batch, height, width, _ = views.shape
    pooled = views.reshape(batch, height // 8, 8, width // 8, 8, 3).mean((2, 4))
    cams = jnp.moveaxis(pooled, -1, 1)
    return cams, jnp.broadcast_to(jnp.eye(pooled.shape[1] * pooled.shape[2]), (batch,) + (cams[0, 0].size,) * 2)


def test_multiscale_cams_sum_scaled_and_flipped_passes():
    image = RNG.random((32, 40, 3)).astype(np.float32)
    labels = np.array([1, 0, 1], np.float32)
    cams = multiscale_cams(_position_cam_fn, image, labels, 8, scales=(1.0,))
    single = resize(_position_cam_fn(image[None])[0][0], (32, 40), method="bilinear", axes=(1, 2))
    flipped = resize(_position_cam_fn(image[None, :, ::-1])[0][0], (32, 40), method="bilinear",
                     axes=(1, 2))[:, :, ::-1]
    np.testing.assert_allclose(cams, (single + flipped) * labels[:, None, None], rtol=1e-5, atol=1e-6)
    assert not np.asarray(cams[1]).any()  # absent class zeroed
    # Flip symmetry: the summed CAM of the mirrored image is the mirrored summed CAM (at scales where no
    # bottom/right crop to the patch size breaks the symmetry).
    image = RNG.random((32, 48, 3)).astype(np.float32)
    mirrored = multiscale_cams(_position_cam_fn, image[:, ::-1], labels, 8, scales=(1.0, 1.5))
    np.testing.assert_allclose(mirrored, multiscale_cams(_position_cam_fn, image, labels, 8,
                                                         scales=(1.0, 1.5))[:, :, ::-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than one patch"):
        multiscale_cams(_position_cam_fn, image, labels, 8, scales=(0.1,))


def test_cam_function_without_patch_attention_skips_the_refinement():
    image = RNG.random((32, 40, 3)).astype(np.float32)
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

    image = RNG.random((35, 45, 3)).astype(np.float32)
    cams = multiscale_cams(cam_fn, image, np.array([0, 1, 1]), 8)
    assert cams.shape == (3, 35, 45) and np.isfinite(np.asarray(cams)).all()
