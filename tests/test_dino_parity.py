"""DINO (`jaxseg.models.dino.DINOHead`, `jaxseg.losses.dino`, the teacher / centre updates of
`jaxseg.methods.dino.DinoOptimizer`) against the PyTorch reference written from facebookresearch/dino
(`jaxseg/testing/references/dino.py`): random weights, CPU, float32. Head outputs and the loss within 1e-5
relative, gradients within 1e-4; one optimizer step moves the teacher and the centre as the official EMA
updates do (1e-6). The encoder is the shared ViT (tests/test_vit_parity.py)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxseg.losses.dino import dino_loss, updated_center
from jaxseg.methods.dino.method import DinoOptimizer
from jaxseg.models.dino import DINOHead
from jaxseg.testing.references.dino import TorchDINOHead, TorchDINOLoss, ema_update, jax_head_params
from jaxseg.testing.references.timm_vit import rel_err

K, VIEWS, BATCH = 48, 4, 3


def test_head_loss_and_gradients_match_reference():
    torch.manual_seed(0)
    head = TorchDINOHead(32, K, nlayers=3, hidden_dim=64, bottleneck_dim=16)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)  # a direction of norm != 1: the normalisation must divide it away
    features = torch.randn(VIEWS * BATCH, 32, requires_grad=True)
    teacher_features = torch.randn(2 * BATCH, 32)
    reference = TorchDINOLoss(K, VIEWS)
    reference.center = torch.randn(1, K) * 0.1
    center = reference.center.numpy()[0].copy()
    student = head(features)
    teacher = head(teacher_features).detach()
    loss = reference(student, teacher, temp=0.05)
    loss.backward()

    module, params = DINOHead(K, 64, 16, 3), jax_head_params(head)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32))))["params"]
    assert jax.tree_util.tree_structure(flax.linen.unbox(abstract)) == jax.tree_util.tree_structure(params)

    def loss_fn(p, x):
        out = module.apply({"params": p}, x).reshape(VIEWS, BATCH, K)
        target = module.apply({"params": p}, jnp.asarray(teacher_features.numpy())).reshape(2, BATCH, K)
        return dino_loss(out, jax.lax.stop_gradient(target), jnp.asarray(center), 0.1, 0.05), out

    (value, out), (param_grads, feature_grads) = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(
        params, jnp.asarray(features.detach().numpy()))
    assert rel_err(out.reshape(VIEWS * BATCH, K), student.detach().numpy()) <= 1e-5
    assert rel_err(value, loss.item()) <= 1e-5
    assert rel_err(feature_grads, features.grad.numpy()) <= 1e-4
    expected = jax_head_params_grads(head)
    for name, grad in flax.traverse_util.flatten_dict(param_grads, sep="/").items():
        assert rel_err(grad, expected[name]) <= 1e-4, name


def jax_head_params_grads(head):
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    grads = {}
    for i, m in enumerate(linears):
        grads[f"mlp_{i}/kernel"], grads[f"mlp_{i}/bias"] = m.weight.grad.numpy().T, m.bias.grad.numpy()
    grads["last_layer"] = head.last_layer.weight_v.grad.numpy().T
    return grads


def test_teacher_and_center_follow_the_official_ema():
    torch.manual_seed(1)
    student, teacher = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    params = {"student": {"w": student.weight.detach().numpy().copy()},
              "teacher": {"w": teacher.weight.detach().numpy().copy()}, "center": np.zeros(4, np.float32)}
    optimizer = DinoOptimizer(lr=0.0, teacher_momentum=0.9)  # the student stays: the teacher's step alone
    tx = optimizer.build(params, total_steps=10)
    center_target = np.arange(4, dtype=np.float32)
    grads = {"student": {"w": np.ones((4, 5), np.float32)}, "teacher": {"w": np.zeros((4, 5), np.float32)},
             "center": params["center"] - center_target}
    updates, _ = tx.update(grads, tx.init(params), params)
    ema_update(student, teacher, momentum=0.9)  # step 0 of the cosine: the starting momentum
    np.testing.assert_allclose(params["teacher"]["w"] + updates["teacher"]["w"], teacher.weight.detach().numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(params["center"] + updates["center"], center_target)


def test_center_update_matches_reference():
    reference = TorchDINOLoss(K, VIEWS)
    reference.center = torch.randn(1, K)
    teacher = torch.randn(2 * BATCH, K)
    expected = reference.center * 0.9 + teacher.mean(0, keepdim=True) * 0.1
    got = updated_center(jnp.asarray(reference.center.numpy()[0]), jnp.asarray(teacher.numpy()).reshape(2, BATCH, K),
                         0.9)
    np.testing.assert_allclose(got, expected.numpy()[0], rtol=1e-6, atol=1e-6)
