"""TransMix (`jaxseg.losses.transmix`, WeakTr's `method.transmix`) against a PyTorch reference of the official
code (`jaxseg/testing/references/transmix.py`: Beckschen/TransMix `transmix.py` and `train.py`, timm's
`rand_bbox` and `SoftTargetCrossEntropy`), random weights, CPU, float32: for the same box, the mixed
images, the mixed labels and the loss within 1e-5 relative, the parameter gradients within 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from timm.data.mixup import rand_bbox

from jaxseg.config import RuleError
from jaxseg.convert import from_official_weaktr, from_timm
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.multilabel import cam_loss, soft_target_cross_entropy
from jaxseg.losses.transmix import (
    TransMixConfig,
    box_from_lambda,
    cutmix,
    mix_labels,
    sample_box,
    transmix_lambda,
)
from jaxseg.methods.weaktr import WeakTrMethod, WeakTrOptimizer
from jaxseg.models.vit_taps import tap_attention
from jaxseg.testing.references.timm_vit import rel_err
from jaxseg.testing.references.transmix import classifier_transmix, weaktr_transmix
from jaxseg.testing.references.weaktr import TINY, random_torch_weaktr
from jaxseg.testing.vit_classifier import random_timm_classifier

SIZE, GRID = (32, 32), (4, 4)
IMAGES = np.random.default_rng(3).standard_normal((4, *SIZE, 3)).astype(np.float32)
# Boxes of whole patches and of parts of patches (the official's nearest sampling takes each patch's
# top-left pixel), one reaching the border, and the empty box of an unmixed batch.
BOXES = [(8, 24, 0, 16), (3, 21, 5, 30), (0, 32, 17, 32), (0, 0, 0, 0)]


@pytest.mark.parametrize("seed", range(4))
def test_box_is_timms_rand_bbox(seed):
    """For the same lambda and centre, the box is timm's `rand_bbox` (the official's CutMix box)."""
    rng = np.random.default_rng(seed)
    size = (32, 48) if seed % 2 else (37, 37)
    for lam in rng.uniform(0, 1, 5):
        np.random.seed(seed)
        center = np.random.randint(0, size[0]), np.random.randint(0, size[1])
        np.random.seed(seed)
        expected = rand_bbox((3, *size), lam)
        got = jax.jit(box_from_lambda, static_argnums=2)(jnp.float32(lam), jnp.asarray(center), size)
        assert tuple(int(v) for v in got) == tuple(int(v) for v in expected), (lam, center)


def test_sample_box_probability_and_range():
    size = (32, 48)
    keys = jax.random.split(jax.random.key(0), 200)
    boxes = np.asarray(jax.vmap(lambda k: sample_box(k, size, 0.5, 1.0))(keys))
    empty = (boxes == 0).all(1)
    assert 0.35 < empty.mean() < 0.65  # about half the batches mixed
    assert (boxes[:, 0] <= boxes[:, 1]).all() and (boxes[:, 2] <= boxes[:, 3]).all()
    assert boxes[:, 1].max() <= size[0] and boxes[:, 3].max() <= size[1] and boxes.min() >= 0
    assert (np.asarray(jax.vmap(lambda k: sample_box(k, size, 0.0, 1.0))(keys[:20])) == 0).all()
    with pytest.raises(RuleError, match="alpha"):
        TransMixConfig(prob=1.0, alpha=0.0)
    with pytest.raises(UserError, match="attention"):
        TransMixConfig(attention="sum")


@pytest.fixture(scope="module")
def classifier():
    """The reference classifier, and the jitted loss and gradients of the same network here (one program
    for every box)."""
    torch_model, model, params = random_timm_classifier(3)

    def step(params, labels, box):
        mixed = cutmix(IMAGES, box)
        logits, (tap,) = tap_attention(lambda: model.apply({"params": params}, mixed), layers=(2,))
        lam = transmix_lambda(tap["probs"][:, :, 0, 1:].mean(1), box, SIZE, GRID)
        targets = mix_labels(labels, lam)
        return soft_target_cross_entropy(logits, targets), (mixed, targets)
    return torch_model, params, jax.jit(jax.value_and_grad(step, has_aux=True))


@pytest.mark.parametrize("box", BOXES)
def test_classifier_matches_official(classifier, box):
    """A timm ViT classifier trained with TransMix: the mixed images, the attention-weighted soft targets,
    the soft-target cross-entropy and its gradients, as the official step."""
    torch_model, params, step = classifier
    labels = np.eye(3, dtype=np.float32)[[0, 2, 1, 2]]
    x, target, loss = classifier_transmix(torch_model, IMAGES, labels, box)
    torch_model.zero_grad()
    loss.backward()
    (value, (mixed, targets)), grads = step(params, labels, jnp.asarray(box))
    errors = {"images": rel_err(mixed, x.permute(0, 2, 3, 1).numpy()),
              "labels": rel_err(targets, target.numpy()), "loss": rel_err(value, loss.item())}
    expected = {"encoder": _torch_grads(torch_model, lambda sd: from_timm(sd, num_heads=4)[1]),
                "head": {"kernel": torch_model.head.weight.grad.numpy().T, "bias": torch_model.head.bias.grad.numpy()}}
    grad_errors = _tree_errors(grads, expected)
    print(box, errors, max(grad_errors.values()))
    assert max(errors.values()) <= 1e-5, errors
    assert max(grad_errors.values()) <= 1e-4, grad_errors


def _torch_grads(torch_model, convert):
    """The reference's parameter gradients in jaxseg's parameter layout (the converter's own mapping)."""
    grads = {name: p.grad.clone() for name, p in torch_model.named_parameters() if p.grad is not None}
    return convert(grads)


def _tree_errors(actual, expected) -> dict:
    """Relative error of each gradient leaf, leaving out those that vanish in exact arithmetic (the key
    biases, which the softmax cancels: rounding noise ~1e-9 of the largest gradient)."""
    reference = dict(jax.tree_util.tree_leaves_with_path(expected))
    largest = max(np.abs(leaf).max() for leaf in reference.values())
    return {jax.tree_util.keystr(path): rel_err(leaf, reference[path])
            for path, leaf in jax.tree_util.tree_leaves_with_path(actual)
            if np.abs(reference[path]).max() > 1e-6 * largest}


def _method(config, **transmix):
    return WeakTrMethod(model=config, optimizer=WeakTrOptimizer(), total_steps=1, batch_size=4,
                        data=DataConfig(name="jaxseg_scenes"), crop_size=SIZE[0], transmix=TransMixConfig(**transmix))


@pytest.mark.parametrize("attention,box", [("per_class", BOXES[1]), ("mean", BOXES[1]), ("per_class", BOXES[3])])
def test_weaktr_stage1_loss_matches_reference(attention, box):
    """WeakTr's stage-1 loss with TransMix (each class token's attention weighs its class, or their mean
    every class) and its gradients, against the official label function run per class on the reference."""
    torch_model = random_torch_weaktr()
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=TINY["num_heads"])
    labels = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], np.float32)
    _, target, loss = weaktr_transmix(torch_model, IMAGES, labels, box, attention)
    torch_model.zero_grad()
    loss.backward()
    method = _method(config, prob=1.0, attention=attention)
    batch = {"image": IMAGES, "labels": labels}
    (value, terms), grads = jax.jit(jax.value_and_grad(method.transmix_loss, has_aux=True))(
        params, batch, jnp.asarray(box), jax.random.key(0))
    expected = _torch_grads(torch_model, lambda sd: from_official_weaktr(sd, num_heads=TINY["num_heads"])[1])
    grad_errors = _tree_errors(grads, expected)
    errors = {"loss": rel_err(value, loss.item())}
    print(attention, box, errors, max(grad_errors.values()))
    assert max(errors.values()) <= 1e-5, errors
    assert max(grad_errors.values()) <= 1e-4, grad_errors


def test_weaktr_transmix_is_off_by_default_and_jits_when_on():
    """Off by default (the loss is the plain stage-1 loss, bit for bit); on, the sampled box goes through
    the same jitted loss, and an unmixed batch (prob 0 inside the sampler) gives the plain loss's value."""
    torch_model = random_torch_weaktr()
    config, params = from_official_weaktr(torch_model.state_dict(), num_heads=TINY["num_heads"])
    labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3]]
    batch = {"image": IMAGES, "labels": labels}
    plain = _method(config)
    assert plain.transmix == TransMixConfig() and plain.transmix.prob == 0.0
    rng, step = jax.random.key(1), jnp.int32(0)
    value, _ = jax.jit(plain.loss)(params, batch, rng, step)
    expected, _ = cam_loss(plain.network.apply({"params": params}, IMAGES, train=True, rngs={"dropout": rng}), labels)
    assert float(value) == float(expected)
    mixed, terms = jax.jit(_method(config, prob=1.0).loss)(params, batch, rng, step)
    assert np.isfinite(float(mixed)) and 0 <= float(terms["transmix_lambda"]) <= 1
    with pytest.raises(UserError, match="remat"):
        _method({**config, "encoder": {**config["encoder"], "remat": True}}, prob=1.0)
