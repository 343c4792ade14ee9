"""Dense-CRF test and benchmark inputs: CAM-like pseudo-labels made from ground truth, and the exact
dense CRF (every pixel pair summed, O(N^2)) that both pydensecrf and `jaxseg.wsss.dense_crf` approximate
with the permutohedral lattice."""
from __future__ import annotations

import jax
import numpy as np

from jaxseg.wsss.crf import CrfParams


def cam_like_labels(semantic: np.ndarray, rng: np.random.Generator, cell: int = 16,
                    noise: float = 0.25) -> np.ndarray:
    """Pseudo-labels with a CAM's faults, from (H, W) ground truth (255: ignored, taken as background
    0): each label's mask averaged over `cell` x `cell` cells (a CAM's patch grid), upsampled
    bilinearly, plus smooth noise of amplitude `noise`, then the argmax. The regions come out blobby, with
    boundaries up to about a cell off the objects' and some small objects lost or grown. H and W must be
    multiples of `cell`."""
    semantic = np.where(np.asarray(semantic) == 255, 0, semantic)
    height, width = semantic.shape
    ids = np.unique(semantic)
    masks = (semantic[None] == ids[:, None, None]).astype(np.float32)
    grid = masks.reshape(len(ids), height // cell, cell, width // cell, cell).mean((2, 4))
    smooth = rng.normal(size=(len(ids), height // cell + 1, width // cell + 1)).astype(np.float32)
    scores = (np.asarray(jax.image.resize(grid, (len(ids), height, width), "bilinear"))
              + noise * np.asarray(jax.image.resize(smooth, (len(ids), height + cell, width + cell),
                                                    "bicubic"))[:, :height, :width])
    return ids[scores.argmax(0)]


def exact_dense_crf(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """(L, H, W) marginals of the dense CRF of `jaxseg.wsss.dense_crf` with the kernels summed exactly
    over all pixel pairs, in float64: for images of a few thousand pixels."""
    num_labels, height, width = unary.shape
    rows, cols = np.mgrid[:height, :width]
    position = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.float64)
    colour = np.asarray(image, np.float64).reshape(-1, 3)

    def normalised_kernel(features):
        squared = (features ** 2).sum(1)
        kernel = np.exp(-0.5 * np.maximum(squared[:, None] + squared[None] - 2 * features @ features.T, 0))
        scale = 1 / np.sqrt(kernel.sum(1))
        return scale[:, None] * kernel * scale[None]

    kernels = [(params.gaussian_compat, normalised_kernel(position / params.gaussian_sxy)),
               (params.bilateral_compat, normalised_kernel(np.concatenate(
                   [position / params.bilateral_sxy, colour / params.bilateral_srgb], 1)))]
    energy = -np.asarray(unary, np.float64).reshape(num_labels, -1)

    def softmax(x):
        e = np.exp(x - x.max(0))
        return e / e.sum(0)

    q = softmax(energy)
    for _ in range(params.iterations):
        q = softmax(energy + sum(compat * q @ kernel for compat, kernel in kernels))
    return q.reshape(num_labels, height, width)
