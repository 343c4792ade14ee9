"""Optional dense CRF: a clear error without the extra; with pydensecrf installed, it cleans label noise."""
import importlib.util

import numpy as np
import pytest

from jaxseg.wsss import crf

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None


@pytest.mark.skipif(HAS_CRF, reason="pydensecrf is installed: the missing-extra message cannot be shown")
def test_missing_extra_gives_an_install_hint():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ImportError, match=r"pip install 'jaxseg\[crf\]'"):
        crf.crf_from_labels(image, np.zeros((8, 8), np.int32), crf.PSEUDO_LABEL_CRF["voc"])


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
    refined = crf.crf_from_labels(image, noisy, crf.PSEUDO_LABEL_CRF["voc"])
    assert set(np.unique(refined)) <= {0, 7}
    assert (refined != truth).mean() < 0.5 * (noisy != truth).mean()
    scores = np.stack([(noisy == 0) * 0.8 + 0.1, np.full((40, 40), 0.05), (noisy == 7) * 0.8 + 0.1])
    refined = crf.crf_from_scores(image, scores, crf.PREDICTION_CRF["voc"])
    assert (refined != np.where(truth == 7, 2, 0)).mean() < 0.5 * (noisy != truth).mean()


def test_bad_image_is_named():
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) image"):
        crf.crf_from_labels(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.int32),
                            crf.PSEUDO_LABEL_CRF["voc"])
