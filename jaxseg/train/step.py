"""The compiled training step and its state, apart from the loop that feeds it (`jaxseg.train.trainer`):
benchmarks and the GPU script time exactly this step without the input pipeline or checkpoints (and so
without grain or orbax)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxseg import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def abstract_train_state(method, seed: int, mesh: jax.sharding.Mesh, rules: parallel.LogicalRules):
    """(init function of the train state, its abstract value, its shardings); building it checks the
    method's model and optimizer settings without computing anything."""
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = method.init_params(params_rng)
        opt_state = method.optimizer_for(nn.unbox(params)).init(nn.unbox(params))
        return TrainState(jnp.zeros([], jnp.int32), params, opt_state, state_rng)
    boxed = jax.eval_shape(init, jax.random.PRNGKey(seed))
    shardings = parallel.tree_shardings(boxed, mesh, rules)
    return init, nn.unbox(boxed), nn.unbox(shardings)


def initial_state(init: Callable, shardings: Any, seed: int) -> TrainState:
    """The state of the method's initialisation at `seed`, created in its shardings (call inside the mesh
    and rules context)."""
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.PRNGKey(seed))


def make_train_step(method, shardings) -> Callable:
    """The jitted train step (state donated): (state, global batch) -> (state, metrics)."""
    def step_fn(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        tx = method.optimizer_for(state.params)
        (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
            state.params, batch, step_rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state, rng), metrics
    return jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,))
