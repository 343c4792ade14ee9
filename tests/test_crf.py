"""Dense CRF: pydensecrf (the optional extra) gives a clear error when missing and cleans label noise;
its JAX port (`jaxseg.wsss.dense_crf`) matches the exact dense CRF without pydensecrf, pydensecrf itself
where installed, and is a batched, padded, jitted pure function; the pseudo-label tool's CRF options."""
import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.cli import pseudo_labels
from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.testing.crf import cam_like_labels, exact_dense_crf
from jaxseg.wsss import crf, dense_crf
from jaxseg.wsss.cam import foreground_labels

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
VOC, COCO = crf.PSEUDO_LABEL_CRF["voc"], crf.PSEUDO_LABEL_CRF["coco"]


@pytest.fixture
def without_pydensecrf(monkeypatch):
    """pydensecrf made unimportable, installed or not."""
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_extra_gives_an_install_hint(without_pydensecrf):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ImportError, match=r"pip install 'jaxseg\[crf\]'"):
        crf.crf_from_labels(image, np.zeros((8, 8), np.int32), VOC)


def _two_region_scene():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = (200, 40, 40)
    truth = np.where(np.arange(40)[None, :] >= 20, 7, 0).repeat(40, 0)
    noisy = np.where(rng.random((40, 40)) < 0.15, 7 - truth, truth)
    return image, truth, noisy


@pytest.mark.skipif(not HAS_CRF, reason="optional extra jaxseg[crf] (pydensecrf) not installed")
def test_crf_removes_label_noise_along_colour_edges():
    image, truth, noisy = _two_region_scene()
    refined = crf.crf_from_labels(image, noisy, VOC)
    assert set(np.unique(refined)) <= {0, 7}
    assert (refined != truth).mean() < 0.5 * (noisy != truth).mean()
    scores = np.stack([(noisy == 0) * 0.8 + 0.1, np.full((40, 40), 0.05), (noisy == 7) * 0.8 + 0.1])
    refined = crf.crf_from_scores(image, scores, crf.PREDICTION_CRF["voc"])
    assert (refined != np.where(truth == 7, 2, 0)).mean() < 0.5 * (noisy != truth).mean()


def test_bad_image_is_named():
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) image"):
        crf.crf_from_labels(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.int32), VOC)
    with pytest.raises(ValueError, match="include every id of the label map"):
        dense_crf.crf_from_labels([np.zeros((8, 8, 3), np.uint8)], [np.full((8, 8), 3)], VOC, labels=[[0, 1]])


LABELS = 8  # the unaries' label axis: one compiled CRF for every scene


@pytest.fixture(scope="module")
def scenes():
    """Three 32 px scenes: uint8 images (3, 32, 32, 3), CAM-like pseudo-labels (4 px cells, on which the
    CRF changes 5-18% of the pixels), the ids the CRF chooses from (the background and the image's
    classes) and their unaries (3, LABELS, 32, 32)."""
    rng = np.random.default_rng(0)
    config = SceneConfig(image_size=32)
    images, label_maps, ids = [], [], []
    for index in range(3):
        scene = generate_scene(config, index)
        truth = foreground_labels(scene["semantic"], config.num_thing_classes)
        images.append(scene["image"])
        label_maps.append(cam_like_labels(truth, rng, cell=4, noise=0.5))
        ids.append(np.concatenate([[0], np.flatnonzero(scene["labels"][:config.num_thing_classes]) + 1]))
    unary = np.stack([np.asarray(dense_crf.unary_from_labels(np.searchsorted(i, m), len(i), size=LABELS))
                      for i, m in zip(ids, label_maps)])
    return np.stack(images), label_maps, ids, unary


@pytest.mark.parametrize("params", [VOC, COCO], ids=["voc", "coco"])
def test_jax_crf_agrees_with_the_exact_dense_crf(scenes, params):
    """The lattice approximates the exact kernel sums as pydensecrf's does: >= 97% of the labels equal,
    and >= 90% where the exact CRF changes the input (measured on these scenes: 99.1-100% of all pixels,
    94.6-100% of the 58-182 changed ones)."""
    images, label_maps, ids, unary = scenes
    ours = np.asarray(dense_crf.dense_crf(images, unary, params)).argmax(1)
    for image, label_map, i, u, labels in zip(images, label_maps, ids, unary, ours):
        exact = exact_dense_crf(image, u, params).argmax(0)
        assert (labels == exact).mean() >= 0.97
        changed = exact != np.searchsorted(i, label_map)
        assert (labels == exact)[changed].mean() >= 0.9


@pytest.mark.parametrize("params", [VOC, COCO], ids=["voc", "coco"])
def test_jax_crf_agrees_with_pydensecrf(scenes, params):
    """A port of pydensecrf's lattice: the same labels at >= 97% of the pixels and marginals within 1e-3
    (measured: every label, marginals within 6e-6; the float summation order differs)."""
    pytest.importorskip("pydensecrf")
    images, label_maps, ids, unary = scenes
    ours = np.asarray(dense_crf.dense_crf(images, unary, params))
    for image, label_map, i, u, marginals in zip(images, label_maps, ids, unary, ours):
        reference = crf.crf_from_labels(image, label_map, params, labels=i)
        assert (i[marginals.argmax(0)] == reference).mean() >= 0.97
        assert np.abs(marginals[:len(i)] - crf.marginals(image, u[:len(i)], params)).max() < 1e-3
        assert np.all(marginals[len(i):] == 0)


def test_jax_crf_recovers_two_flat_regions_from_noisy_labels():
    """From hard labels (gt_prob 0.7) and from probabilities, in one batch."""
    image, truth, noisy = _two_region_scene()
    probabilities = np.stack([(noisy == 0) * 0.8 + 0.1, np.full((40, 40), 0.05), (noisy == 7) * 0.8 + 0.1])
    unary = jnp.stack([dense_crf.unary_from_labels(noisy // 7, 2, size=3),
                       dense_crf.unary_from_probabilities(probabilities)])
    marginals = np.asarray(dense_crf.dense_crf(np.stack([image, image]), unary, VOC))
    for labels in marginals.argmax(1):
        assert (np.where(labels > 0, 7, 0) != truth).mean() < 0.2 * (noisy != truth).mean()


def test_jax_crf_is_a_batched_padded_pure_function(scenes):
    """Marginals sum to 1, absent labels (+inf) get none; an image gets the same marginals alone or next
    to others (rows of one batch are independent) and when padded into a larger canvas; relabelling
    permutes them."""
    images, label_maps, ids, unary = scenes
    batch = np.asarray(dense_crf.dense_crf(images, unary, VOC))
    assert batch.shape == (3, LABELS, 32, 32) and np.isfinite(batch).all()
    np.testing.assert_allclose(batch.sum(1), 1, atol=1e-5)
    for marginals, i in zip(batch, ids):
        assert np.all(marginals[len(i):] == 0)
    order = np.concatenate([np.arange(len(ids[0]))[::-1], np.arange(len(ids[0]), LABELS)])
    canvas, padded_unary = np.zeros((3, 40, 48, 3), np.uint8), np.zeros((3, LABELS, 40, 48), np.float32)
    valid = np.zeros((3, 40, 48), bool)
    canvas[:, :32, :32], valid[:, :32, :32] = images[[0, 0, 1]], True
    padded_unary[:, :, :32, :32] = unary[0], unary[0, order], unary[1]
    padded = np.asarray(dense_crf.dense_crf(canvas, padded_unary, VOC, valid))[..., :32, :32]
    np.testing.assert_allclose(padded[0], batch[0], atol=1e-4)
    np.testing.assert_allclose(padded[1], batch[0, order], atol=1e-4)
    np.testing.assert_allclose(padded[2], batch[1], atol=1e-4)


def test_unary_from_labels_is_pydensecrfs():
    labels = np.array([[0, 1], [2, 1]])
    unary = np.asarray(dense_crf.unary_from_labels(labels, 3, gt_prob=0.7, size=4))
    expected = np.full((4, 2, 2), -np.log(0.3 / 2))
    expected[labels, np.arange(2)[:, None], np.arange(2)] = -np.log(0.7)
    expected[3] = np.inf
    np.testing.assert_allclose(unary, expected, rtol=1e-6)
    if HAS_CRF:
        from pydensecrf.utils import unary_from_labels

        reference = unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False).reshape(3, 2, 2)
        np.testing.assert_allclose(unary[:3], reference, rtol=1e-6)
    with pytest.raises(ValueError, match="gt_prob must lie in"):
        dense_crf.unary_from_labels(labels, 3, gt_prob=1.0)


def _error(capsys, code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], err


def test_pseudo_label_tool_refuses_crf_options_that_cannot_apply(tmp_path, capsys, without_pydensecrf):
    common = ["--checkpoint", str(tmp_path / "none"), "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]
    _error(capsys, pseudo_labels.main(common + ["--crf_workers", "2"]), "add --crf voc or --crf coco")
    _error(capsys, pseudo_labels.main(common + ["--crf", "voc", "--crf_workers", "2"]), "the jax backend")
    _error(capsys, pseudo_labels.main(common + ["--crf", "voc", "--crf-backend", "pydensecrf", "--crf_workers", "0"]),
           "--crf_workers must be at least 1")
    _error(capsys, pseudo_labels.main(common + ["--crf", "voc", "--crf_backend", "pydensecrf"]),
           "pip install 'jaxseg[crf]'")
    _error(capsys, pseudo_labels.main(common + ["--crf", "ade"]), "invalid choice: 'ade'")
    assert not (tmp_path / "out").exists()
