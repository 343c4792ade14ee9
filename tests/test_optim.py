"""Optimizer recipes: EoMT's schedules and layer decay, and AdamW groups against torch.optim.AdamW."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxseg.methods.eomt import EomtOptimizer
from jaxseg.methods.segmenter import SegmenterOptimizer
from jaxseg.methods.weaktr import timm_cosine_per_epoch
from jaxseg.train.optim import adamw_groups, layer_decay, regex_labels, warmup_poly


def test_two_stage_warmup_poly_values():
    head = warmup_poly(1e-4, 10_000, 500)
    backbone = warmup_poly(1e-4, 10_000, 1000, frozen_steps=500)
    np.testing.assert_allclose([head(0), head(250), head(500)], [0, 0.5e-4, 1e-4], rtol=1e-6)
    np.testing.assert_allclose([backbone(0), backbone(499), backbone(1000), backbone(1500)],
                               [0, 0, 0.5e-4, 1e-4], rtol=1e-6)
    np.testing.assert_allclose(head(5250), 1e-4 * (1 - 4750 / 9500) ** 0.9, rtol=1e-5)
    np.testing.assert_allclose(backbone(5750), 1e-4 * (1 - 4250 / 8500) ** 0.9, rtol=1e-5)
    assert float(head(10_000)) == 0.0
    with pytest.raises(ValueError, match="must exceed"):
        warmup_poly(1e-4, 1000, 1000, frozen_steps=500)


PARAMS = {"encoder": {"patch_embed": {"kernel": jnp.ones((2, 2))}, "pos_embed": jnp.ones(3),
                      "blocks_0": {"w": jnp.ones(2)}, "blocks_2": {"w": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}},
          "class_head": {"kernel": jnp.ones((2, 2))}}


def test_layer_decay_follows_eomt():
    m = layer_decay(PARAMS, depth=3, decay=0.8)
    assert m["encoder"]["blocks_0"]["w"] == pytest.approx(0.64)
    assert m["encoder"]["blocks_2"]["w"] == 1.0
    assert m["encoder"]["patch_embed"]["kernel"] == m["encoder"]["pos_embed"] == pytest.approx(0.64)
    assert m["encoder"]["norm"]["scale"] == 1.0 and m["class_head"]["kernel"] == 1.0
    # DINOv3 recipes (llrd_l2_enabled False): the last L2 blocks keep the full lr, earlier ones still decay.
    exempt = layer_decay(PARAMS, depth=3, decay=0.8, undecayed_last=1)
    assert exempt["encoder"]["blocks_2"]["w"] == 1.0 and exempt["encoder"]["blocks_0"]["w"] == pytest.approx(0.64)
    exempt = layer_decay(PARAMS, depth=3, decay=0.8, undecayed_last=3)
    assert exempt["encoder"]["blocks_0"]["w"] == 1.0


def test_adamw_groups_match_torch():
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal((2, 3)).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(6)]
    schedules = {"slow": lambda t: 1e-2 * (t + 1) / 6, "fast": lambda t: jnp.full((), 3e-2)}
    labels = regex_labels(params, [("^a$", "slow")], "fast")
    multipliers = {"a": 0.5, "b": 1.0}
    tx = adamw_groups(labels, multipliers, schedules, weight_decay=0.05)
    state, ours = tx.init(params), dict(params)
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [torch_params["a"]]}, {"params": [torch_params["b"]]}],
                            weight_decay=0.05)
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        opt.param_groups[0]["lr"] = 0.5 * 1e-2 * (step + 1) / 6
        opt.param_groups[1]["lr"] = 3e-2
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        opt.step()
    for k in params:
        np.testing.assert_allclose(ours[k], torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_frozen_backbone_accumulates_moments_without_moving():
    tx = EomtOptimizer().build(PARAMS, 3000, 3)
    state = tx.init(PARAMS)
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    params = PARAMS
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["encoder"]["blocks_0"]["w"], PARAMS["encoder"]["blocks_0"]["w"])
    assert not np.array_equal(params["class_head"]["kernel"], PARAMS["class_head"]["kernel"])
    adam_state = state[1]  # chain: (clip, adam, weight decay, schedules)
    assert float(jnp.abs(adam_state.mu["encoder"]["blocks_0"]["w"]).sum()) > 0
    with pytest.raises(ValueError, match="no schedule for parameter group"):
        adamw_groups({"a": "x"}, {"a": 1.0}, {"y": lambda t: 0.0}, weight_decay=0.0)


def test_segmenter_optimizer_matches_torch_sgd_nesterov_with_poly_decay():
    """WeakTr stage 2: torch SGD(nesterov, momentum 0.9) with the encoder group at 0.1x and the
    per-iteration poly rate (1e-4 - 1e-5) (1 - t / T)^0.9 + 1e-5."""
    rng = np.random.default_rng(1)
    params = {"encoder": {"w": rng.standard_normal(4).astype(np.float32)},
              "decoder": {"w": rng.standard_normal((2, 3)).astype(np.float32)}}
    total = 6
    grads = [jax.tree_util.tree_map(lambda v: rng.standard_normal(v.shape).astype(np.float32), params)
             for _ in range(total)]
    tx = SegmenterOptimizer(lr=1e-2, min_lr=1e-3).build(params, total)
    state, ours = tx.init(params), params
    torch_params = {k: torch.nn.Parameter(torch.tensor(v["w"])) for k, v in params.items()}
    opt = torch.optim.SGD([{"params": [torch_params["encoder"]], "scale": 0.1},
                           {"params": [torch_params["decoder"]], "scale": 1.0}],
                          lr=1e-2, momentum=0.9, nesterov=True)
    for step, g in enumerate(grads):
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        for group in opt.param_groups:
            group["lr"] = group["scale"] * ((1e-2 - 1e-3) * (1 - step / total) ** 0.9 + 1e-3)
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k]["w"])
        opt.step()
    for k in params:
        np.testing.assert_allclose(ours[k]["w"], torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_weaktr_schedule_is_timm_cosine_stepped_after_each_epoch():
    from timm.scheduler import CosineLRScheduler

    model = torch.nn.Linear(1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=7.5e-5)
    timm_schedule = CosineLRScheduler(opt, t_initial=60, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5)
    ours = timm_cosine_per_epoch(7.5e-5, steps_per_epoch=3, epochs=60)
    lrs = []
    for epoch in range(60):
        lrs.append(opt.param_groups[0]["lr"])  # the rate epoch `epoch` trains at
        timm_schedule.step(epoch)
    np.testing.assert_allclose([ours(3 * e + 2) for e in range(60)], lrs, rtol=1e-5)
    np.testing.assert_allclose([ours(3 * e) for e in range(60)], lrs, rtol=1e-5)
