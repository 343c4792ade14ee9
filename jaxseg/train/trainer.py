"""The one training loop: a method plugs in as a `Task`; the loop owns sharding, optimisation,
checkpoints, resumption, logging and the non-finite guard.

State is created from `jax.eval_shape` with `out_shardings` (the full model never exists unsharded), the
step is jitted with the state donated, and each checkpoint holds the state, the data iterator position
and the config, so a resumed run continues with exactly the batches and numbers it would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.train import sharding
from jaxseg.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a method provides to the loop."""

    def init_params(self, rng: jax.Array) -> Any:
        """Parameters (may carry logical-axis boxes) from an rng; traced under `jax.eval_shape`."""

    def optimizer(self, params: Any) -> optax.GradientTransformation:
        """The optimiser for these (unboxed) parameters."""

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, {name: scalar metric}) of one global batch; traced inside jit."""

    def train_data(self, seed: int) -> Iterator[dict]:
        """A checkpointable (grain) iterator of this host's training batches."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss; the offending batch was saved next to the checkpoints."""


@dataclasses.dataclass
class TrainConfig:
    total_steps: int
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int = 3
    mesh: tuple = (("data", -1), ("fsdp", 1), ("tensor", 1))
    rules: tuple = sharding.DEFAULT_RULES


class Trainer:
    def __init__(self, task: Task, config: TrainConfig, workdir: str | pathlib.Path,
                 config_to_save: dict | None = None, devices: Sequence[jax.Device] | None = None):
        self.task, self.config = task, config
        self.workdir = pathlib.Path(workdir)
        self.checkpointer = Checkpointer(self.workdir, max_to_keep=config.max_to_keep)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        self.config_to_save = config_to_save or {}
        self.history: list[dict] = []

    def _abstract_state(self):
        def init(rng):
            params_rng, state_rng = jax.random.split(rng)
            params = self.task.init_params(params_rng)
            opt_state = self.task.optimizer(nn.unbox(params)).init(nn.unbox(params))
            return TrainState(jnp.zeros([], jnp.int32), params, opt_state, state_rng)
        boxed = jax.eval_shape(init, jax.random.PRNGKey(self.config.seed))
        shardings = sharding.tree_shardings(boxed, self.mesh, self.config.rules)
        return init, nn.unbox(boxed), nn.unbox(shardings)

    def _make_step(self, shardings) -> Callable:
        def step_fn(state: TrainState, batch: dict):
            rng, step_rng = jax.random.split(state.rng)
            tx = self.task.optimizer(state.params)
            (loss, metrics), grads = jax.value_and_grad(self.task.loss, has_aux=True)(
                state.params, batch, step_rng, state.step)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
            return TrainState(state.step + 1, params, opt_state, rng), metrics
        return jax.jit(step_fn, in_shardings=(shardings, None), out_shardings=(shardings, None),
                       donate_argnums=(0,))

    def run(self) -> TrainState:
        init, abstract, shardings = self._abstract_state()
        data = self.task.train_data(self.config.seed)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.config.rules):
            if self.checkpointer.latest_step() is not None:
                target = jax.tree_util.tree_map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
                state, _ = self.checkpointer.restore(target, data)
                log.info("resumed from step %d", int(state.step))
            else:
                state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
                    jax.random.PRNGKey(self.config.seed))
            step_fn = self._make_step(shardings)
            start, started_at = int(state.step), time.perf_counter()
            for step in range(start, self.config.total_steps):
                batch = next(data)
                state, metrics = step_fn(state, batch)
                if (step + 1) % self.config.log_every == 0 or step + 1 == self.config.total_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    self._guard(metrics, step, batch)
                    self._log(step + 1, metrics, started_at, start)
                if (step + 1) % self.config.checkpoint_every == 0 or step + 1 == self.config.total_steps:
                    self.checkpointer.save(step + 1, state, data, self.config_to_save)
            self.checkpointer.wait_until_finished()
        return state

    def _guard(self, metrics: dict, step: int, batch: dict) -> None:
        if not np.isfinite(metrics["loss"]):
            path = self.workdir / f"nonfinite_batch_step{step}.npz"
            np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
            self.checkpointer.wait_until_finished()
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}; the batch is saved in {path}")

    def _log(self, step: int, metrics: dict, started_at: float, start: int) -> None:
        elapsed = time.perf_counter() - started_at
        rate = (step - start) / max(elapsed, 1e-9)
        eta = (self.config.total_steps - step) / max(rate, 1e-9)
        self.history.append(dict(metrics, step=step))
        print(f"step {step}/{self.config.total_steps} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(
            metrics.items())) + f" | {rate:.2f} steps/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(metrics, step=step)) + "\n")
