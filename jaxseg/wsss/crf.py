"""Dense CRF post-processing with pydensecrf (the optional `crf` extra: pip install 'jaxseg[crf]'), and
WeakTr's parameters, which `jaxseg.wsss.dense_crf` (the same CRF in JAX) shares.

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


def require_pydensecrf() -> None:
    """Raises `MissingDependencyError` (naming the extra to install) where pydensecrf is missing."""
    _densecrf()


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    except ImportError:
        raise MissingDependencyError("dense CRF needs the optional dependency pydensecrf: pip install "
                                     "'jaxseg[crf]' (the maintained pydensecrf2 package; it builds from source in "
                                     "about a minute)") from None
    return dcrf, utils


def marginals(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """pydensecrf's mean-field marginals (L, H, W) for (L, H, W) unary energies (-log p) of a uint8
    (H, W, 3) image."""
    dcrf, _ = _densecrf()
    num_labels, height, width = unary.shape
    # Copies below: pydensecrf takes writable buffers, and datasets and JAX hand out read-only arrays.
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.array(np.reshape(unary, (num_labels, -1)), np.float32, order="C"))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.array(image, np.uint8, order="C"), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations)).reshape(num_labels, height, width)


def check_image(image: np.ndarray, size: tuple) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != size:
        raise UserError(f"CRF needs the uint8 (H, W, 3) image of the labels' size {size}, got "
                        f"{image.dtype} {image.shape}")


def label_indices(label_map: np.ndarray, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, the (H, W) map as indices into them) for a CRF over `labels`, the ids it chooses from
    (default: those in the map; WeakTr's: the background and the image's classes, some of which the map
    may lack, and their number sets the unary)."""
    label_map = np.asarray(label_map)
    ids = np.unique(label_map) if labels is None else np.asarray(labels)
    indices = np.searchsorted(ids, label_map)
    if (ids.ndim != 1 or len(ids) == 0 or np.any(np.diff(ids) <= 0)
            or np.any(ids[np.minimum(indices, len(ids) - 1)] != label_map)):
        raise UserError(f"CRF labels must be increasing ids that include every id of the label map, got "
                        f"{ids.tolist()} for a map of ids {np.unique(label_map).tolist()}")
    return ids, indices


def crf_from_labels(image: np.ndarray, label_map: np.ndarray, params: CrfParams, gt_prob: float = 0.7,
                    labels=None) -> np.ndarray:
    """Refine an (H, W) label map (any ids) over `labels` (`label_indices`); returns the same ids."""
    check_image(image, np.shape(label_map))
    _, utils = _densecrf()
    ids, indices = label_indices(label_map, labels)
    if len(ids) == 1:  # nothing to choose (and pydensecrf's unary divides by n - 1)
        return np.asarray(label_map).copy()
    unary = utils.unary_from_labels(indices, len(ids), gt_prob=gt_prob, zero_unsure=False)
    return ids[marginals(image, unary.reshape((len(ids),) + indices.shape), params).argmax(0)]


def crf_from_scores(image: np.ndarray, scores: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine (K, H, W) class scores over the classes that win somewhere; returns (H, W) class ids."""
    check_image(image, scores.shape[1:])
    present = np.unique(scores.argmax(0))
    return present[marginals(image, -np.log(np.clip(scores[present], 1e-5, None)), params).argmax(0)]
