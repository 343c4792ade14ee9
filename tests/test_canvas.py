"""The batched canvas forms of the evaluation schemes (`jaxseg.inference.canvas`) against their per-image
reference forms (`jaxseg.testing.per_image`): one batch of images of different sizes and orientations, a
score function that depends on position (so that a transposed or shifted window would show), fp32,
tolerance 1e-5 relative; beyond each image the canvas holds zeros (or -inf mask logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.inference import canvas
from jaxseg.testing import per_image

RNG = np.random.default_rng(0)
CLASSES, QUERIES, CROP = 5, 3, 16
SIZES = [(20, 37), (40, 18), (16, 16), (30, 30), (12, 50)]
IMAGES = [RNG.integers(0, 255, size=s + (3,), dtype=np.uint8) for s in SIZES]
PIXEL_WEIGHTS = jnp.asarray(RNG.normal(size=(3, CLASSES)), jnp.float32)
CLASS_WEIGHTS = jnp.asarray(RNG.normal(size=(3, QUERIES * (CLASSES + 1))), jnp.float32)


def _score_fn(windows):
    """(n, h, w, 3) -> (n, K, h, w): a per-pixel linear map plus a pattern that depends on the position."""
    height, width = windows.shape[1:3]
    position = jnp.sin(jnp.arange(height)[:, None] * 0.3 + jnp.arange(width)[None] * 0.2)
    return jnp.einsum("nhwc,ck->nkhw", windows, PIXEL_WEIGHTS) + position


def _predict(images):
    """A mask-classification stand-in: (n, 16, 16, 3) -> class logits (n, Q, K+1), mask logits (n, Q, 8, 8)."""
    pooled = images.reshape(images.shape[0], 8, 2, 8, 2, 3).mean((2, 4))
    masks = jnp.einsum("nhwc,cq->nqhw", pooled, PIXEL_WEIGHTS[:, :QUERIES])
    classes = jnp.einsum("nc,ck->nk", images.mean((1, 2)), CLASS_WEIGHTS)
    return classes.reshape(-1, QUERIES, CLASSES + 1), masks


def _batch(inputs):
    return jax.tree_util.tree_map(lambda *x: jnp.asarray(np.stack(x)), *inputs)


def _relative(actual, expected):
    return float(jnp.abs(actual - expected).max() / jnp.abs(expected).max())


def test_sliding_windows_match_the_per_image_scheme():
    batch = _batch([canvas.sliding_inputs(image, CROP, 64, max_windows=5) for image in IMAGES])
    scores = canvas.sliding_scores(_score_fn, batch, CROP, lambda x: x / 255)
    for i, image in enumerate(IMAGES):
        height, width = image.shape[:2]
        expected = per_image.sliding_window_scores(_score_fn, jnp.asarray(image, jnp.float32) / 255, CROP)
        assert _relative(scores[i, :, :height, :width], expected) < 1e-5, image.shape
        assert not scores[i, :, height:].any() and not scores[i, :, :, width:].any()


def test_multiscale_flip_matches_the_per_image_scheme():
    ratios, base, window, stride = (0.5, 1.0, 1.5), 18, 16, 10

    def normalize(x):
        return (x - 100.0) / 50.0
    batch = _batch([canvas.multiscale_flip_inputs(image, ratios, base=base, window=window, stride=stride,
                                                  canvas=(64, 64), max_scaled=(160, 160)) for image in IMAGES])
    probs = canvas.multiscale_flip_probs(_score_fn, batch, window, normalize)
    for i, image in enumerate(IMAGES):
        height, width = image.shape[:2]
        expected = per_image.multiscale_flip_probs(_score_fn, normalize(jnp.asarray(image, jnp.float32)), ratios,
                                                   base_short_side=base, window=window, stride=stride)
        assert _relative(probs[i, :, :height, :width], expected) < 1e-5, image.shape
        assert not probs[i, :, height:].any() and not probs[i, :, :, width:].any()


def test_resize_pad_matches_the_per_image_scheme():
    batch = _batch([canvas.resize_pad_inputs(image, CROP, (64, 64)) for image in IMAGES])
    class_logits, mask_logits = canvas.resize_pad_logits(_predict, batch, CROP, lambda x: x / 255)
    for i, image in enumerate(IMAGES):
        height, width = image.shape[:2]
        expected_classes, expected_masks = per_image.padded_square_logits(
            _predict, jnp.asarray(image, jnp.float32) / 255, CROP)
        assert _relative(class_logits[i], expected_classes) < 1e-5
        assert _relative(mask_logits[i, :, :height, :width], expected_masks) < 1e-5, image.shape
        assert bool(jnp.all(mask_logits[i, :, height:] == -jnp.inf))


def test_images_beyond_the_static_bounds_are_refused_by_name():
    with pytest.raises(ValueError, match="does not fit the 16x64 prediction canvas"):
        canvas.resize_pad_inputs(IMAGES[0], CROP, (16, 64))
    with pytest.raises(ValueError, match="a 12x50 image needs 5 windows of 16 px, more than the predictor"):
        canvas.sliding_inputs(IMAGES[4], CROP, 64, max_windows=2)
    with pytest.raises(ValueError, match="more than the predictor's plane"):
        canvas.multiscale_flip_inputs(IMAGES[4], (1.0,), base=18, window=16, stride=10, canvas=(64, 64),
                                      max_scaled=(32, 32))


def test_fitted_settings_hold_every_image():
    settings = canvas.fitted_settings({"kind": "semantic", "canvas": (16, 16), "max_windows": 2}, SIZES)
    assert settings == {"kind": "semantic", "canvas": (40, 50), "max_windows": 6}
