"""EoMT with a frozen encoder (`optimizer.freeze_encoder`): the encoder never moves and has no optimizer
state, the queries still learn through the blocks they pass, the heads keep the recipe's schedule and
clipping, the compiled step needs less memory, checkpoints round-trip, and full training is unchanged.

All on a tiny EoMT (width 32, depth 2, 8 queries, 32 px, batch 2, 256 points) through the shipped train
step (`Trainer.make_step`)."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import SCENES_CLASSES, SCENES_THINGS
from jaxseg import methods
from jaxseg.config import apply_overrides, load_config
from jaxseg.data.datasets import DataConfig
from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.errors import UserError
from jaxseg.losses.mask_classification import SetLossConfig
from jaxseg.methods.eomt import Annealing, EomtMethod, EomtOptimizer
from jaxseg.parallel import DEFAULT_RULES, MeshConfig, global_batch
from jaxseg.runs import sections
from jaxseg.train.checkpoint import check_resumable
from jaxseg.train.trainer import TrainConfig, Trainer

SIZE, BATCH, STEPS = 32, 2, 3
MODEL = dict(encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4)),
             num_classes=SCENES_CLASSES, num_queries=8, num_query_blocks=1)
# As the dataset source gives them: (H, W, 1) semantic labels.
SCENES = [dict(scene, semantic=scene["semantic"][..., None])
          for scene in (generate_scene(SceneConfig(image_size=SIZE), i) for i in range(8))]


def _method(freeze: bool, total_steps: int = 10) -> EomtMethod:
    # No warm-up: the encoder of full training moves from the first step. Masking is annealed away before
    # step 0, so short runs need no annealing windows.
    return EomtMethod(model=MODEL, optimizer=EomtOptimizer(lr=1e-3, warmup=(0, 0), freeze_encoder=freeze),
                      total_steps=total_steps, batch_size=BATCH, data=DataConfig(name="jaxseg_scenes"),
                      crop_size=SIZE, num_things=SCENES_THINGS, max_segments=8,
                      set_loss=SetLossConfig(num_points=256), annealing=Annealing((-2,), (-1,)))


def _batch(method) -> dict:
    rng = np.random.default_rng(0)
    examples = [method.train_transform(SCENES[i], rng) for i in range(BATCH)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _is_encoder(path) -> bool:
    return any(getattr(key, "key", None) == "encoder" for key in path)


def _split(params) -> tuple[list, list]:
    """(encoder leaves, other leaves) as host arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return ([np.asarray(v) for p, v in leaves if _is_encoder(p)],
            [np.asarray(v) for p, v in leaves if not _is_encoder(p)])


def _run(freeze: bool, workdir: pathlib.Path) -> dict:
    """The shipped step of one setting: its abstract state, compiled memory analysis, and the params
    before and after STEPS steps."""
    method = _method(freeze)
    mesh = MeshConfig().make_mesh(jax.devices()[:1])
    trainer = Trainer(method, TrainConfig(total_steps=10, batch_size=BATCH), workdir, [], mesh=mesh)
    init, abstract, shardings = trainer.abstract_state()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = trainer.initial_state(init, shardings)
        before = jax.device_get(state.params)  # the step donates the state
        batch = global_batch(_batch(method), mesh)
        compiled = trainer.make_step(shardings).lower(state, batch).compile()
        history = []
        for _ in range(STEPS):
            state, metrics = compiled(state, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return dict(abstract=abstract, memory=compiled.memory_analysis(), before=before,
                after=jax.device_get(state.params), history=history)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{freeze_encoder: `_run`} for both settings."""
    return {freeze: _run(freeze, tmp_path_factory.mktemp("run")) for freeze in (False, True)}


def test_frozen_encoder_is_bit_identical_and_the_heads_learn(runs):
    """Frozen: every encoder param keeps its initial bytes and every other param moves; full training
    (the previous behaviour) moves every param, the encoder's included."""
    for freeze, run in runs.items():
        (encoder_before, heads_before), (encoder_after, heads_after) = _split(run["before"]), _split(run["after"])
        assert len(encoder_before) > 10 and len(heads_before) > 10
        kept = [a.tobytes() == b.tobytes() for a, b in zip(encoder_after, encoder_before)]
        assert all(kept) if freeze else not any(kept), freeze
        assert not any(np.array_equal(a, b) for a, b in zip(heads_after, heads_before)), freeze
        assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in run["history"]), freeze


def test_optimizer_state_holds_no_encoder_arrays(runs):
    """Frozen: the optimizer state is the heads' two Adam moments and two step counters (int32), nothing
    for an encoder param; full: the moments of every param."""
    for freeze, run in runs.items():
        params = jax.tree_util.tree_flatten_with_path(run["abstract"].params)[0]
        opt_leaves = jax.tree_util.tree_flatten_with_path(run["abstract"].opt_state)[0]
        num_encoder = sum(_is_encoder(p) for p, _ in params)
        encoder_bytes = sum(v.size * v.dtype.itemsize for p, v in params if _is_encoder(p))
        head_bytes = sum(v.size * v.dtype.itemsize for p, v in params if not _is_encoder(p))
        opt_bytes = sum(v.size * v.dtype.itemsize for _, v in opt_leaves)
        assert sum(v.shape == () for _, v in opt_leaves) == 2 and encoder_bytes > head_bytes
        encoder_moments = [p for p, _ in opt_leaves if _is_encoder(p)]
        if freeze:
            assert not encoder_moments
            assert len(opt_leaves) == 2 * (len(params) - num_encoder) + 2
            assert opt_bytes == 2 * head_bytes + 8
        else:
            assert len(encoder_moments) == 2 * num_encoder
            assert opt_bytes == 2 * (encoder_bytes + head_bytes) + 8


def test_compiled_step_needs_less_memory(runs):
    """XLA's memory analysis of the compiled train step (CPU, jax 0.10.2), measured 2026-12-03:

    | setting | arguments + outputs | temporaries |
    |---|---|---|
    | full    | 813,768 B | 1,289,600 B |
    | frozen  | 430,696 B | 1,150,080 B |

    The frozen step drops the encoder's Adam moments from its state (in and out) and the encoder's weight
    gradients from its temporaries. Exact sizes follow the XLA version: only the order is asserted."""
    sizes = {freeze: (run["memory"].argument_size_in_bytes + run["memory"].output_size_in_bytes,
                      run["memory"].temp_size_in_bytes) for freeze, run in runs.items()}
    print(sizes)
    (full_io, full_temp), (frozen_io, frozen_temp) = sizes[False], sizes[True]
    assert frozen_io < full_io and frozen_temp < full_temp


def test_gradients_reach_the_queries_through_the_frozen_blocks():
    """The loss's gradients under the switch: exactly zero for the encoder, and for every other param
    (the queries, which reach the predictions only through the last encoder block, included) those of
    full training."""
    full, frozen = _method(False), _method(True)
    params = nn.unbox(full.init_params(jax.random.PRNGKey(0)))
    batch = jax.tree_util.tree_map(jnp.asarray, _batch(full))

    def grads(method):
        loss = lambda p, b: method.loss(p, b, jax.random.PRNGKey(1), jnp.int32(0))[0]  # noqa: E731
        return jax.jit(jax.grad(loss))(params, batch)

    full_grads, frozen_grads = grads(full), grads(frozen)
    (full_encoder, full_heads), (frozen_encoder, frozen_heads) = _split(full_grads), _split(frozen_grads)
    assert all(not g.any() for g in frozen_encoder) and all(g.any() for g in full_encoder)
    assert all(g.any() for g in frozen_heads) and np.asarray(frozen_grads["queries"]).any()
    for a, b in zip(frozen_heads, full_heads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_heads_keep_the_recipes_schedule_and_clipping():
    """With zero encoder gradients, the frozen recipe moves the heads exactly as the full recipe (LLRD 0.8,
    warm-up (2, 3), clipping at 0.5, which these gradients exceed) does, across both warm-ups, and its
    encoder updates are zero while the full recipe's encoder moves (weight decay) once its warm-up starts.
    The frozen recipe has no encoder warm-up, so a run no longer than it still builds."""
    params = jax.device_get(nn.unbox(_method(False).init_params(jax.random.PRNGKey(0))))
    recipe = dict(lr=1e-3, layer_decay=0.8, warmup=(2, 3), clip_norm=0.5)
    full = EomtOptimizer(**recipe).build(params, 12, depth=2)
    frozen = EomtOptimizer(**recipe, freeze_encoder=True).build(params, 12, depth=2)
    full_state, frozen_state = full.init(params), frozen.init(params)
    rng = np.random.default_rng(0)
    full_encoder_moved = []
    for _ in range(8):
        grads = jax.tree_util.tree_map_with_path(
            lambda p, v: np.zeros_like(v) if _is_encoder(p) else rng.standard_normal(v.shape).astype(v.dtype),
            params)
        full_updates, full_state = full.update(grads, full_state, params)
        frozen_updates, frozen_state = frozen.update(grads, frozen_state, params)
        (full_encoder, full_heads), (frozen_encoder, frozen_heads) = _split(full_updates), _split(frozen_updates)
        for a, b in zip(frozen_heads, full_heads):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
        assert all(not u.any() for u in frozen_encoder)
        full_encoder_moved.append(any(u.any() for u in full_encoder))
        params = optax.apply_updates(params, full_updates)
    # lr 0 for warmup[0] = 2 steps, and at the first step of the warm-up, which starts from 0
    assert full_encoder_moved == [False, False, False] + [True] * 5
    EomtOptimizer(**recipe, freeze_encoder=True).build(params, 4, depth=2)
    with pytest.raises(UserError, match="must exceed the frozen"):
        EomtOptimizer(**recipe).build(params, 4, depth=2)


def test_checkpoints_round_trip_and_the_switch_cannot_flip_on_resume(tmp_path):
    """A frozen run saves and resumes (its encoder unchanged across the resume, its heads learning); a rerun
    with the switch flipped is refused with the reason before it changes the run, and the run's params
    start a new, fully trained one."""
    workdir = tmp_path / "frozen"

    def trainer(freeze, steps, directory=workdir, **config):
        return Trainer(_method(freeze, steps), TrainConfig(total_steps=steps, batch_size=BATCH, checkpoint_every=2,
                                                           **config), directory, SCENES)

    first = trainer(True, 2).run()
    resumed = trainer(True, 4).run()
    assert int(resumed.step) == 4
    (first_encoder, first_heads), (resumed_encoder, resumed_heads) = _split(first.params), _split(resumed.params)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first_encoder, resumed_encoder))
    assert not any(np.array_equal(a, b) for a, b in zip(first_heads, resumed_heads))

    files = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    _, abstract, _ = trainer(False, 6).abstract_state()
    with pytest.raises(UserError, match="optimizer.freeze_encoder"):
        check_resumable(workdir, abstract)
    with pytest.raises(UserError, match="optimizer.freeze_encoder"):
        trainer(False, 6).run()
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == files

    started = trainer(False, 2, tmp_path / "full", init_checkpoint=str(workdir)).run()
    assert int(started.step) == 2 and not any(
        np.array_equal(a, b) for a, b in zip(_split(started.params)[0], resumed_encoder))


def test_the_switch_is_a_setting():
    config = load_config("configs/eomt/scenes.py:runlocal")
    assert config.optimizer.freeze_encoder is False
    apply_overrides(config, ["optimizer.freeze_encoder=True"])
    assert methods.build(config, sections(config).data).optimizer.freeze_encoder
    with pytest.raises(UserError, match="is not a bool"):
        apply_overrides(config, ["optimizer.freeze_encoder=1"])
