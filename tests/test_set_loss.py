"""The set loss against transformers' `EomtLoss` (float32, CPU), with PyTorch's random points replayed.

`torch.rand` is wrapped to record every draw of the reference: per image one (1, P, 2) set for the
matcher, then (pairs, 3P, 2) importance candidates and (pairs, P/4, 2) fresh points for the matched
pairs in HF's order (image by image, by query index). The same points are placed into jaxseg's
per-target-slot layout, so both sides compute on identical samples. Tolerances: 1e-5 relative for
costs and loss terms, 1e-4 for gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import EomtConfig
from transformers.models.eomt import modeling_eomt as hf

from jaxseg.losses.mask_classification import LayerDraws, SetLossConfig, Targets, layer_loss, matching_cost, set_loss
from jaxseg.testing.references.timm_vit import rel_err

B, Q, K, G = 2, 8, 4, 3
NUM_POINTS = 64
CONFIG = SetLossConfig(num_points=NUM_POINTS)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    class_logits = rng.standard_normal((B, Q, K + 1)).astype(np.float32)
    mask_logits = (2 * rng.standard_normal((B, Q, 16, 16))).astype(np.float32)
    counts = [3, 2]  # image 1 has one padded target slot
    masks = np.zeros((B, G, 32, 32), np.float32)
    labels = np.zeros((B, G), np.int32)
    valid = np.zeros((B, G), bool)
    yy, xx = np.mgrid[:32, :32]
    for b, count in enumerate(counts):
        for g in range(count):
            cy, cx, r = rng.uniform(4, 28), rng.uniform(4, 28), rng.uniform(3, 10)
            masks[b, g] = (np.hypot(yy - cy, xx - cx) < r)
            labels[b, g] = rng.integers(0, K)
            valid[b, g] = True
    return class_logits, mask_logits, Targets(masks, labels, valid), counts


class RandRecorder:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []
        self.original = torch.rand

    def __call__(self, *size, **kwargs):
        kwargs.pop("device", None)
        out = self.original(*size, generator=self.generator, **kwargs)
        self.draws.append(out.clone())
        return out


def _run_hf(class_logits, mask_logits, targets, counts, monkeypatch):
    config = EomtConfig(num_labels=K, train_num_points=NUM_POINTS)
    criterion = hf.EomtLoss(config, {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})
    recorder = RandRecorder(0)
    monkeypatch.setattr(torch, "rand", recorder)
    indices = []
    criterion.matcher.register_forward_hook(lambda m, i, out: indices.extend(out))
    cl = torch.tensor(class_logits, requires_grad=True)
    ml = torch.tensor(mask_logits, requires_grad=True)
    losses = criterion(masks_queries_logits=ml, class_queries_logits=cl,
                       mask_labels=[torch.tensor(targets.masks[b, :n]) for b, n in enumerate(counts)],
                       class_labels=[torch.tensor(targets.labels[b, :n]).long() for b, n in enumerate(counts)])
    total = 5 * losses["loss_mask"] + 5 * losses["loss_dice"] + 2 * losses["loss_cross_entropy"]
    total.backward()
    monkeypatch.undo()
    return losses, indices, recorder.draws, cl.grad.numpy(), ml.grad.numpy()


def _replayed_draws(draws, indices):
    match_points = torch.cat(draws[:B]).numpy()
    candidates, fresh = draws[B].numpy(), draws[B + 1].numpy()
    ours_candidates = np.zeros((B, G, *candidates.shape[1:]), np.float32)
    ours_fresh = np.zeros((B, G, *fresh.shape[1:]), np.float32)
    pair = 0
    for b, (_, target_idx) in enumerate(indices):
        for j in target_idx.tolist():
            ours_candidates[b, j], ours_fresh[b, j] = candidates[pair], fresh[pair]
            pair += 1
    return LayerDraws(match_points, ours_candidates, ours_fresh)


@pytest.mark.parametrize("matcher", ["hungarian", "scipy"])
def test_layer_loss_matches_transformers(monkeypatch, matcher):
    class_logits, mask_logits, targets, counts = _problem()
    losses, indices, draws, cl_grad, ml_grad = _run_hf(class_logits, mask_logits, targets, counts,
                                                       monkeypatch)
    config = SetLossConfig(num_points=NUM_POINTS, matcher=matcher)
    replay = _replayed_draws(draws, indices)

    # Matcher cost of each image against HF's own pairwise functions on the same points.
    cost = np.asarray(matching_cost(class_logits, mask_logits, targets, replay.match_points, config))
    for b, n in enumerate(counts):
        points = torch.tensor(replay.match_points[b:b + 1])
        pred = hf.sample_point(torch.tensor(mask_logits[b])[:, None], points.repeat(Q, 1, 1),
                               align_corners=False).squeeze(1)
        tgt = hf.sample_point(torch.tensor(targets.masks[b, :n])[:, None], points.repeat(n, 1, 1),
                              align_corners=False).squeeze(1)
        expected = (5 * hf.pair_wise_sigmoid_cross_entropy_loss(pred, tgt)
                    - 2 * torch.tensor(class_logits[b]).softmax(-1)[:, torch.tensor(targets.labels[b, :n]).long()]
                    + 5 * hf.pair_wise_dice_loss(pred, tgt)).numpy()
        assert rel_err(cost[b, :, :n], expected) <= 1e-5

    def total(cl, ml):
        terms, matching = layer_loss(cl, ml, targets, replay, config)
        return 5 * terms["mask"] + 5 * terms["dice"] + 2 * terms["class"], (terms, matching)

    (_, (terms, matching)), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        class_logits, mask_logits)
    for b, (query_idx, target_idx) in enumerate(indices):
        ours = {(int(matching.query_of_target[b, j]), j) for j in range(G) if matching.matched[b, j]}
        assert ours == set(zip(query_idx.tolist(), target_idx.tolist()))
    errors = {"mask": rel_err(terms["mask"], losses["loss_mask"].item()),
              "dice": rel_err(terms["dice"], losses["loss_dice"].item()),
              "class": rel_err(terms["class"], losses["loss_cross_entropy"].item()),
              "grad_class_logits": rel_err(grads[0], cl_grad),
              "grad_mask_logits": rel_err(grads[1], ml_grad)}
    print(matcher, errors)
    assert max(errors[k] for k in ("mask", "dice", "class")) <= 1e-5, errors
    assert max(errors["grad_class_logits"], errors["grad_mask_logits"]) <= 1e-4, errors


def test_set_loss_sums_layers_and_compiles_once():
    class_logits, mask_logits, targets, _ = _problem(1)
    stacked_cl = jnp.stack([class_logits, class_logits[:, ::-1]])
    stacked_ml = jnp.stack([mask_logits, -mask_logits])
    traces = []

    @jax.jit
    def loss(cl, ml, key):
        traces.append(1)
        return set_loss(cl, ml, targets, key, CONFIG)

    total, terms = loss(stacked_cl, stacked_ml, jax.random.key(0))
    assert terms["mask"].shape == (2,) and np.isfinite(float(total))
    expected = 5 * terms["mask"].sum() + 5 * terms["dice"].sum() + 2 * terms["class"].sum()
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    loss(stacked_cl, stacked_ml, jax.random.key(1))
    assert len(traces) == 1
    # A perfect prediction scores far lower than a random one (not zero: the importance-sampled points
    # sit on mask boundaries, where bilinear sampling blurs both logits and targets).
    perfect_ml = np.full((B, Q, 32, 32), -20.0, np.float32)
    perfect_cl = np.full((B, Q, K + 1), -10.0, np.float32)
    perfect_cl[..., K] = 10.0
    for b in range(B):
        for g in range(G):
            if targets.valid[b, g]:
                perfect_ml[b, g] = np.where(targets.masks[b, g] > 0, 20.0, -20.0)
                perfect_cl[b, g] = -10.0
                perfect_cl[b, g, targets.labels[b, g]] = 10.0
    good, _ = loss(jnp.asarray(perfect_cl)[None], jnp.asarray(perfect_ml)[None], jax.random.key(2))
    assert float(good) < 0.3 * float(total) / 2


def test_bad_shapes_are_named():
    class_logits, mask_logits, targets, _ = _problem()
    with pytest.raises(ValueError, match="stacked predictions"):
        set_loss(class_logits, mask_logits, targets, jax.random.key(0), CONFIG)
    with pytest.raises(ValueError, match="targets must be masks"):
        set_loss(class_logits[None], mask_logits[None], Targets(targets.masks, targets.labels[:, :2],
                                                                 targets.valid), jax.random.key(0), CONFIG)
