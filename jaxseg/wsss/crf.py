"""Optional dense CRF post-processing (pydensecrf, from the `crf` extra: pip install 'jaxseg[crf]').

WeakTr refines hard pseudo-labels in stage 1 (unary from labels, gt_prob 0.7) and soft predictions in
stage 2 (unary -log(clip(p, 1e-5))), each with dataset-specific pairwise terms, 10 mean-field steps.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxseg.errors import MissingDependencyError, UserError


@dataclasses.dataclass(frozen=True)
class CrfParams:
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int = 10


# (weaktr.md sections 4 and 8)
PSEUDO_LABEL_CRF = {"voc": CrfParams(4, 3, 83, 5, 3), "coco": CrfParams(3, 3, 50, 5, 10)}
PREDICTION_CRF = {"voc": CrfParams(3, 3, 83, 5, 3), "coco": CrfParams(1, 3, 67, 3, 4)}


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    except ImportError:
        raise MissingDependencyError("dense CRF needs the optional dependency pydensecrf: pip install "
                                     "'jaxseg[crf]' (the maintained pydensecrf2 package; it builds from source in "
                                     "about a minute)") from None
    return dcrf, utils


def _infer(image: np.ndarray, unary: np.ndarray, num_labels: int, params: CrfParams) -> np.ndarray:
    dcrf, _ = _densecrf()
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, np.uint8), compat=params.bilateral_compat)
    q = np.asarray(crf.inference(params.iterations)).reshape(num_labels, height, width)
    return q.argmax(0)


def _check_image(image: np.ndarray, size: tuple) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != size:
        raise UserError(f"CRF needs the uint8 (H, W, 3) image of the labels' size {size}, got "
                        f"{image.dtype} {image.shape}")


def crf_from_labels(image: np.ndarray, label_map: np.ndarray, params: CrfParams,
                    gt_prob: float = 0.7) -> np.ndarray:
    """Refine an (H, W) label map (any ids) over the labels it contains; returns the same ids."""
    _check_image(image, label_map.shape)
    _, utils = _densecrf()
    present, compact = np.unique(label_map, return_inverse=True)
    unary = utils.unary_from_labels(compact.reshape(label_map.shape), len(present), gt_prob=gt_prob,
                                    zero_unsure=False)
    return present[_infer(image, unary, len(present), params)]


def crf_from_scores(image: np.ndarray, scores: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine (K, H, W) class scores over the classes that win somewhere; returns (H, W) class ids."""
    _check_image(image, scores.shape[1:])
    present = np.unique(scores.argmax(0))
    unary = -np.log(np.clip(scores[present], 1e-5, None)).reshape(len(present), -1)
    return present[_infer(image, unary, len(present), params)]
