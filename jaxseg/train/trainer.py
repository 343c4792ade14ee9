"""The one training loop: a method plugs in as a `Task`; the loop owns sharding, optimisation,
checkpoints, resumption, logging and the non-finite guard.

State is created from `jax.eval_shape` with `out_shardings` (the full model never exists unsharded), the
step is jitted with the state donated, and each checkpoint holds the state, the data iterator position
and the config, so a resumed run continues with exactly the batches and numbers it would have seen.
A fresh run starts from the workdir's latest checkpoint, else from `init_checkpoint` (params only), else
from the task's initialisation. Each host feeds its own batches; they are assembled into global arrays.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg import parallel
from jaxseg.train.checkpoint import Checkpointer, load_init_params
from jaxseg.train.metric_writer import MetricWriter

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

    # Optional: `evaluate(params, mesh, rules) -> {name: value}`, run every `eval_every` steps and at the end (inside
    # the mesh context; every host calls it, so it must be multi-host correct).


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
    eval_every: int = 0  # 0: evaluate at the end only
    # Params to start a fresh run from (a run directory or a converted params file), placed at the
    # "/"-separated subtree `init_into` of the model's params ("" = the whole tree).
    init_checkpoint: str = ""
    init_into: str = ""
    mesh: tuple = (("data", -1), ("fsdp", 1), ("tensor", 1))
    rules: tuple = parallel.DEFAULT_RULES


class Trainer:
    def __init__(self, task: Task, config: TrainConfig, workdir: str | pathlib.Path,
                 config_to_save: dict | None = None, devices: Sequence[jax.Device] | None = None):
        self.task, self.config = task, config
        self.workdir = pathlib.Path(workdir)
        self.checkpointer = Checkpointer(self.workdir, max_to_keep=config.max_to_keep)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.writer = MetricWriter(self.workdir)
        self.mesh = parallel.make_mesh(config.mesh, devices)
        self.config_to_save = config_to_save or {}
        self.history: list[dict] = []
        self.eval_results: dict = {}

    def _abstract_state(self):
        def init(rng):
            params_rng, state_rng = jax.random.split(rng)
            params = self.task.init_params(params_rng)
            opt_state = self.task.optimizer(nn.unbox(params)).init(nn.unbox(params))
            return TrainState(jnp.zeros([], jnp.int32), params, opt_state, state_rng)
        boxed = jax.eval_shape(init, jax.random.PRNGKey(self.config.seed))
        shardings = parallel.tree_shardings(boxed, self.mesh, self.config.rules)
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
                if self.config.init_checkpoint:
                    state = state.replace(params=self._initial_params(state.params, shardings.params))
            step_fn = self._make_step(shardings)
            start, started_at = int(state.step), time.perf_counter()
            last = self.config.total_steps
            try:
                for step in range(start, last):
                    local_batch = next(data)
                    state, metrics = step_fn(state, parallel.global_batch(local_batch, self.mesh, self.config.rules))
                    done = step + 1
                    if done % self.config.log_every == 0 or done == last:
                        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        self._guard(metrics, step, local_batch)
                        self._log(done, metrics, started_at, start, local_batch)
                    if done % self.config.checkpoint_every == 0 or done == last:
                        self.checkpointer.save(done, state, data, self.config_to_save)
                    if done == last or (self.config.eval_every and done % self.config.eval_every == 0):
                        self._evaluate(done, state.params)
                if start >= last:  # nothing left to train: still report the final model
                    self._evaluate(start, state.params)
            finally:
                self.checkpointer.wait_until_finished()
                self.writer.close()
        return state

    def _initial_params(self, params: Any, params_shardings: Any) -> Any:
        """`params` with the subtree `init_into` replaced by the init checkpoint's (loud name diff)."""
        path = [p for p in self.config.init_into.split("/") if p]
        subtree, subtree_shardings = params, params_shardings
        for name in path:
            if name not in subtree:
                raise KeyError(f"init_into={self.config.init_into!r}: {name!r} is not one of "
                               f"{sorted(subtree)}")
            subtree, subtree_shardings = subtree[name], subtree_shardings[name]
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), subtree)
        loaded = load_init_params(self.config.init_checkpoint, abstract)
        loaded = jax.tree_util.tree_map(lambda x, a, s: jax.device_put(np.asarray(x, a.dtype), s),
                                        loaded, abstract, subtree_shardings)
        log.info("initialised %s from %s", self.config.init_into or "all params", self.config.init_checkpoint)
        if not path:
            return loaded
        params = flax.core.unfreeze(params)
        node = params
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = loaded
        return params

    def _evaluate(self, step: int, params: Any) -> None:
        if not hasattr(self.task, "evaluate"):
            return
        results = self.task.evaluate(params, self.mesh, self.config.rules)
        if not results:
            return
        self.eval_results = dict(results, step=step)
        self.writer.write(step, {k: v for k, v in results.items() if isinstance(v, (int, float))},
                          prefix="eval")
        if jax.process_index() == 0:
            (self.workdir / "eval.json").write_text(json.dumps(self.eval_results, indent=1))
        print(f"eval at step {step}: " + " ".join(
            f"{k}={v:.4g}" for k, v in sorted(results.items()) if isinstance(v, (int, float))),
            file=sys.stderr, flush=True)

    def _guard(self, metrics: dict, step: int, batch: dict) -> None:
        if not np.isfinite(metrics["loss"]):
            # Each host saves its own share of the batch, under its own name.
            host = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
            path = self.workdir / f"nonfinite_batch_step{step}{host}.npz"
            np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
            self.checkpointer.wait_until_finished()
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}; the batch is saved in {path}")

    def _log(self, step: int, metrics: dict, started_at: float, start: int, local_batch: dict) -> None:
        elapsed = time.perf_counter() - started_at
        rate = (step - start) / max(elapsed, 1e-9)
        images = len(jax.tree_util.tree_leaves(local_batch)[0]) * jax.process_count()
        self.history.append(dict(metrics, step=step))
        self.writer.write(step, dict(metrics, steps_per_second=rate, images_per_second=rate * images))
        if jax.process_index() == 0:
            print(progress_line(step, self.config.total_steps, rate, rate * images) + " " + " ".join(
                f"{k}={v:.4g}" for k, v in sorted(metrics.items())), file=sys.stderr, flush=True)


def progress_line(step: int, total: int, steps_per_second: float, images_per_second: float,
                  width: int = 20) -> str:
    """`[=====>     ] 120/300  40% | 3.10 steps/s, 24.8 img/s, ETA 0:00:58`."""
    done = min(step / max(total, 1), 1.0)
    filled = int(done * width)
    bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
    eta = int(round((total - step) / max(steps_per_second, 1e-9)))
    return (f"[{bar}] {step}/{total} {done:4.0%} | {steps_per_second:.2f} steps/s, "
            f"{images_per_second:.1f} img/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
