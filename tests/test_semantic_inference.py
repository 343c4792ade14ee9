"""Sliding-window semantic segmentation: windows, averaging, resizing, and EoMT's score function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.inference.mask_classification import semantic_scores
from jaxseg.inference.semantic import mask_classification_score_fn, window_starts
from jaxseg.models.eomt import EoMT, eomt_config
from jaxseg.ops.resize import resize
from jaxseg.testing.per_image import segment, sliding_window_scores


def _pixels_as_scores(windows):
    return jnp.moveaxis(windows, -1, 1)  # K = 3 "scores": the pixels themselves


@pytest.mark.parametrize("size", [(40, 100), (100, 40), (20, 20), (50, 70), (32, 32)])
def test_windows_reassemble_a_pointwise_score(size):
    """With a per-pixel score function, cutting, averaging and re-assembling must give exactly the
    score of the whole resized image."""
    image = np.random.default_rng(0).random((*size, 3), dtype=np.float32)
    crop = 32
    scale = max(crop / size[0], crop / size[1])
    resized = resize(image, (round(size[0] * scale), round(size[1] * scale)), method="bilinear",
                     antialias=True, axes=(0, 1))
    expected = resize(jnp.moveaxis(resized, -1, 0), size, method="bilinear", axes=(1, 2))
    scores = sliding_window_scores(_pixels_as_scores, image, crop)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert segment(_pixels_as_scores, image, crop).shape == size


def test_windows_start_where_eomt_cuts():
    assert window_starts(2048, 1024) == [0, 1024]
    assert window_starts(683, 512) == [0, 171]


def test_eomt_score_function_on_one_window():
    config = eomt_config("S", num_classes=4, num_queries=5, image_size=32, depth=2, width=32, num_heads=2,
                         mlp_dim=64)
    config["num_query_blocks"] = 1
    model = EoMT(**config)
    image = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
    params = model.init(jax.random.key(0), image[None])["params"]

    def predict(windows):
        out = model.apply({"params": params}, windows)
        return out["class_logits"][-1], out["mask_logits"][-1]

    scores = sliding_window_scores(mask_classification_score_fn(predict), image, 32)
    class_logits, mask_logits = predict(image[None])
    expected = semantic_scores(class_logits[0], resize(mask_logits[0], (32, 32), axes=(-2, -1)))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.shape == (4, 32, 32)


def test_strided_anchors_follow_segmenter():
    from jaxseg.inference.semantic import strided_anchors
    assert strided_anchors(480, 480, 320) == [0]
    assert strided_anchors(520, 480, 320) == [0, 40]
    assert strided_anchors(1000, 480, 320) == [0, 320, 520]


@pytest.mark.parametrize("base,size", [(40, (40, 60)), (20, (30, 20))])
def test_multiscale_flip_probs_with_a_pointwise_score(base, size):
    """With per-pixel logits (the pixels themselves), windowing and flipping must vanish: the result is
    the softmax of the image resized to the scale and back, averaged over the two ratios."""
    from jaxseg.testing.per_image import multiscale_flip_probs
    image = np.random.default_rng(3).random((*size, 3), dtype=np.float32) * 4
    probs = multiscale_flip_probs(_pixels_as_scores, image, ratios=(1.0, 1.5), base_short_side=base,
                                  window=32, stride=16)
    expected = 0
    for ratio in (1.0, 1.5):
        short = ratio * base
        scaled_size = (round(short * size[0] / min(size)), round(short * size[1] / min(size)))
        scaled = resize(image, scaled_size, method="bilinear", antialias=True, axes=(0, 1))
        if min(scaled_size) < 32:
            scaled_size = ((32, int(scaled_size[1] / scaled_size[0] * 32)) if scaled_size[0] < scaled_size[1]
                           else (int(scaled_size[0] / scaled_size[1] * 32), 32))
            scaled = resize(scaled, scaled_size, method="bilinear", axes=(0, 1))
        back = resize(jnp.moveaxis(scaled, -1, 0), size, method="bilinear", axes=(1, 2))
        expected = expected + jax.nn.softmax(back, axis=0)
    np.testing.assert_allclose(probs, expected / 2, rtol=1e-5, atol=1e-6)
