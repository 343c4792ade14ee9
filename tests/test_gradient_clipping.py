"""WeakTr's gradient-clipping loss: the rule against an independent numpy implementation, the gradient
mask, the gate, and the official PyTorch code (`GradientClipping.forward`, in
`jaxseg/testing/references/segmenter.py`) on divisible sizes."""
import jax
import numpy as np
import pytest
import torch

from jaxseg.losses.gradient_clipping import gradient_clipping_loss, pixel_cross_entropy
from jaxseg.testing.references.segmenter import torch_gradient_clipping_loss

RNG = np.random.default_rng(0)


def _inputs(batch=3, height=8, width=12, classes=4, ignore_fraction=0.1):
    logits = (2 * RNG.standard_normal((batch, height, width, classes))).astype(np.float32)
    labels = RNG.integers(0, classes, (batch, height, width)).astype(np.int32)
    labels[RNG.random(labels.shape) < ignore_fraction] = 255
    return logits, labels


def _numpy_rule(logits, labels, cell, start_value):
    """The clipping rule written directly: per-pixel CE in float64, cells as explicit slices."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = labels != 255
    loss = np.where(valid, -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0], 0)
    global_mean = loss.mean()
    if global_mean > start_value:
        return loss.mean(), np.ones(loss.shape, bool), loss, None
    batch_mean = loss.mean(0)
    tau = np.empty(batch_mean.shape)
    for top in range(0, batch_mean.shape[0], cell):
        for left in range(0, batch_mean.shape[1], cell):
            region = (slice(top, top + cell), slice(left, left + cell))
            tau[region] = max(batch_mean[region].mean(), global_mean)
    mask = loss <= tau[None]
    return np.where(mask, loss, tau[None]).mean(), mask, loss, tau


@pytest.mark.parametrize("size,cell", [((8, 12), 4), ((10, 7), 4), ((9, 9), 9), ((5, 13), 6)])
def test_mask_and_loss_match_the_rule(size, cell):
    for _ in range(5):
        logits, labels = _inputs(height=size[0], width=size[1])
        loss, mask = gradient_clipping_loss(logits, labels, patch_size=cell, start_value=10.0)
        ref_loss, ref_mask, ref_pixel, tau = _numpy_rule(logits.astype(np.float64), labels, cell, 10.0)
        decided = np.abs(ref_pixel - tau[None]) > 1e-5  # float32 vs float64 may flip exact near-ties
        np.testing.assert_array_equal(np.asarray(mask)[decided], ref_mask[decided])
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert 0 < ref_mask.mean() < 1  # the test data really clips some pixels


def test_gradient_is_plain_ce_where_kept_and_zero_where_clipped():
    logits, labels = _inputs()
    grad_clipped = jax.grad(lambda x: gradient_clipping_loss(x, labels, patch_size=4, start_value=10.0)[0])(logits)
    grad_plain = jax.grad(lambda x: pixel_cross_entropy(x, labels).mean())(logits)
    _, mask = gradient_clipping_loss(logits, labels, patch_size=4, start_value=10.0)
    mask = np.asarray(mask)
    assert np.all(np.asarray(grad_clipped)[~mask] == 0.0)
    np.testing.assert_array_equal(np.asarray(grad_clipped)[mask], np.asarray(grad_plain)[mask])


def test_above_the_gate_it_is_plain_ce():
    logits, labels = _inputs()
    loss, mask = gradient_clipping_loss(logits, labels, patch_size=4, start_value=0.0)
    assert np.asarray(mask).all()
    np.testing.assert_allclose(loss, pixel_cross_entropy(logits, labels).mean(), rtol=1e-6)
    np.testing.assert_array_equal(
        jax.grad(lambda x: gradient_clipping_loss(x, labels, patch_size=4, start_value=0.0)[0])(logits),
        jax.grad(lambda x: pixel_cross_entropy(x, labels).mean())(logits))


@pytest.mark.parametrize("start_value", [10.0, 0.0])
def test_matches_the_official_code_on_divisible_sizes(start_value):
    logits, labels = _inputs(height=8, width=12)
    pred = torch.tensor(logits).permute(0, 3, 1, 2).requires_grad_(True)
    expected = torch_gradient_clipping_loss(pred, torch.tensor(labels).long(), start_value, 4)
    expected.backward()
    loss, grads = jax.value_and_grad(
        lambda x: gradient_clipping_loss(x, labels, patch_size=4, start_value=start_value)[0])(logits)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grads, pred.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-8)


def test_bad_shapes_are_named():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="logits must be"):
        gradient_clipping_loss(logits, labels[:, :4])
