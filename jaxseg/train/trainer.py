"""The one training loop: a method plugs in through the `Method` protocol (`jaxseg.methods.base`); the
loop owns the input pipeline, sharding, optimisation, checkpoints, resumption, evaluation, logging and the
non-finite guard.

State is created from `jax.eval_shape` with `out_shardings` (the full model never exists unsharded), the
step is jitted with the state donated, and each checkpoint holds the state, the data iterator position
and the config, so a resumed run continues with exactly the batches and numbers it would have seen.
A fresh run starts from the workdir's latest checkpoint, else from `init_checkpoint` (params only), else
from the method's initialisation. Each host feeds its own batches; they are assembled into global arrays.
Evaluations (`jaxseg.evaluate.Evaluator`) run at their cadence and at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from jaxseg import parallel
from jaxseg.config import check_rules, setting
from jaxseg.data.pipeline import train_dataset
from jaxseg.errors import NonFiniteLossError, UnknownKeyError
from jaxseg.train.checkpoint import Checkpointer, load_init_params
from jaxseg.train.metric_writer import MetricWriter
from jaxseg.train.step import TrainState, abstract_train_state, initial_state, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A config's `train` section. `init_checkpoint`: params to start a fresh run from (a run directory or
    a converted params file), its "/"-separated subtree `init_from` ("" = all of it; e.g. "encoder" to take
    the ViT of a WeakTr or EoMT run) placed at the subtree `init_into` of the model's params (""
    = the whole tree); `requires_init_checkpoint`: the recipe fine-tunes pretrained weights and refuses
    to start without them; `num_overlays`: examples of the first evaluation's split drawn to
    WORKDIR/overlays/step_<N>/ after training (0: none); `worker_count`: grain worker processes."""
    total_steps: int = setting(rule=">= 0")  # 0: initialise and evaluate only
    batch_size: int = setting(8, ">= 1")
    seed: int = 0
    log_every: int = setting(10, ">= 1")
    checkpoint_every: int = setting(100, ">= 1")
    max_to_keep: int = setting(3, ">= 1")
    init_checkpoint: str = ""
    init_from: str = ""
    init_into: str = ""
    requires_init_checkpoint: bool = False
    num_overlays: int = setting(8, ">= 0")
    worker_count: int = setting(0, ">= 0")

    def __post_init__(self):
        check_rules(self)


@dataclasses.dataclass
class Evaluation:
    """A named evaluation of the run: its evaluator over `source`, every `every` steps (0: at the end)."""
    evaluator: Any
    source: Sequence[dict]
    every: int = 0


class Trainer:
    def __init__(self, method, config: TrainConfig, workdir: str | pathlib.Path, train_source: Sequence[dict],
                 *, mesh: jax.sharding.Mesh | None = None, rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
                 evaluations: dict[str, Evaluation] | None = None, config_to_save: dict | None = None):
        self.method, self.config, self.train_source = method, config, train_source
        self.workdir = pathlib.Path(workdir)
        self.checkpointer = Checkpointer(self.workdir, max_to_keep=config.max_to_keep)
        self.writer: MetricWriter | None = None  # opened by `run` once the state is there
        self.mesh = mesh if mesh is not None else parallel.MeshConfig().make_mesh()
        self.rules = rules
        self.evaluations = evaluations or {}
        self.config_to_save = config_to_save or {}
        self.history: list[dict] = []
        self.eval_results: dict = {}

    def train_data(self):
        """This host's checkpointable iterator of training batches (the method's augmentation over the
        training source, seeded by the run)."""
        return iter(train_dataset(self.train_source, self.method.train_transform, seed=self.config.seed,
                                  batch_size=self.config.batch_size, worker_count=self.config.worker_count))

    def abstract_state(self):
        """(init function of the state, its abstract value, its shardings)."""
        return abstract_train_state(self.method, self.config.seed, self.mesh, self.rules)

    def make_step(self, shardings) -> Callable:
        """The jitted train step (state donated): (state, global batch) -> (state, metrics)."""
        return make_train_step(self.method, shardings)

    def initial_state(self, init: Callable, shardings: Any) -> TrainState:
        """The state of the method's initialisation at the run's seed, created in its shardings (call
        inside the mesh and rules context, as `run` does)."""
        return initial_state(init, shardings, self.config.seed)

    def run(self) -> TrainState:
        init, abstract, shardings = self.abstract_state()
        data = self.train_data()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            state = self._start(init, abstract, shardings, data)
            start, last = int(state.step), self.config.total_steps
            # Rows of steps after the restored one are about to be logged again.
            self.writer = MetricWriter(self.workdir, purge_step=start + 1 if start else None)
            if jax.process_index() == 0 and self.config_to_save:
                (self.workdir / "config.json").write_text(json.dumps(self.config_to_save, indent=1))
            step_fn = self.make_step(shardings)
            pace = Pace()
            try:
                for step in range(start, last):
                    local_batch = next(data)
                    state, metrics = step_fn(state, parallel.global_batch(local_batch, self.mesh, self.rules))
                    done = step + 1
                    if done == start + 1:  # the first step compiles: the pace counts from its end
                        jax.block_until_ready(metrics)
                        pace.restart(done)
                    if done % self.config.log_every == 0 or done == last:
                        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        self._guard(metrics, step, local_batch)
                        self._log(done, metrics, pace, local_batch)
                    if done % self.config.checkpoint_every == 0 or done == last:
                        self.checkpointer.save(done, state, data, self.config_to_save)
                    due = [name for name, e in self.evaluations.items()
                           if done == last or (e.every and done % e.every == 0)]
                    if due:
                        self._evaluate(done, state.params, due)
                        pace.restart(done)
                if start >= last:  # nothing left to train: still report the final model
                    self._evaluate(start, state.params, list(self.evaluations))
            finally:
                self.checkpointer.wait_until_finished()
                self.writer.close()
        return state

    def _start(self, init: Callable, abstract: Any, shardings: Any, data) -> TrainState:
        """The state to train from: the newest usable checkpoint of the workdir (said on the console),
        else the initialisation with the init checkpoint's params."""
        if self.checkpointer.latest_step() is None:
            state = self.initial_state(init, shardings)
            if self.config.init_checkpoint:
                state = state.replace(params=self._initial_params(state.params, shardings.params))
            return state
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, _ = self.checkpointer.restore(target, data, set_aside_damaged=True)
        if jax.process_index() == 0:
            print(f"resumed from step {int(state.step)} (checkpoint "
                  f"{self.checkpointer.directory / str(self.checkpointer.restored_step)})", file=sys.stderr,
                  flush=True)
        return state

    def _initial_params(self, params: Any, params_shardings: Any) -> Any:
        """`params` with the subtree `init_into` replaced by the init checkpoint's (loud name diff)."""
        path = [p for p in self.config.init_into.split("/") if p]
        subtree, subtree_shardings = params, params_shardings
        for name in path:
            if name not in subtree:
                raise UnknownKeyError(f"init_into={self.config.init_into!r}: {name!r} is not one of "
                                      f"{sorted(subtree)}")
            subtree, subtree_shardings = subtree[name], subtree_shardings[name]
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), subtree)
        loaded = load_init_params(self.config.init_checkpoint, abstract, self.config.init_from)
        loaded = jax.tree_util.tree_map(lambda x, a, s: jax.device_put(np.asarray(x, a.dtype), s),
                                        loaded, abstract, subtree_shardings)
        log.info("initialised %s from %s%s", self.config.init_into or "all params", self.config.init_checkpoint,
                 f" ({self.config.init_from})" if self.config.init_from else "")
        if not path:
            return loaded
        params = flax.core.unfreeze(params)
        node = params
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = loaded
        return params

    def _evaluate(self, step: int, params: Any, names: list[str]) -> None:
        results = {name: self.evaluations[name].evaluator.run(params, self.evaluations[name].source)
                   for name in names}
        self.eval_results = dict(self.eval_results, **results, step=step)
        for name, values in results.items():
            scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            self.writer.write(step, scalars, prefix=f"eval_{name}")
            print(f"eval {name} at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())),
                  file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            (self.workdir / "eval.json").write_text(json.dumps(self.eval_results, indent=1))

    def _guard(self, metrics: dict, step: int, batch: dict) -> None:
        if not np.isfinite(metrics["loss"]):
            # Each host saves its own share of the batch, under its own name.
            host = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
            path = self.workdir / f"nonfinite_batch_step{step}{host}.npz"
            np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
            self.checkpointer.wait_until_finished()
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}; the batch is saved in {path}")

    def _log(self, step: int, metrics: dict, pace: Pace, local_batch: dict) -> None:
        rate = pace.steps_per_second(step)
        images = len(jax.tree_util.tree_leaves(local_batch)[0]) * jax.process_count()
        self.history.append(dict(metrics, step=step))
        speed = {} if rate is None else dict(steps_per_second=rate, images_per_second=rate * images)
        self.writer.write(step, dict(metrics, **speed))
        if jax.process_index() == 0:
            print(progress_line(step, self.config.total_steps, rate, None if rate is None else rate * images)
                  + " " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), file=sys.stderr,
                  flush=True)


class Pace:
    """Training speed over the steps since the first one after a start or resume (that one compiles) or
    since the last evaluation (whose time is not training time)."""

    def __init__(self):
        self.from_step, self.since = None, None

    def restart(self, step: int) -> None:
        self.from_step, self.since = step, time.perf_counter()

    def steps_per_second(self, step: int) -> float | None:
        """None until a step after the compiling one has finished."""
        if self.since is None or step <= self.from_step:
            return None
        return (step - self.from_step) / max(time.perf_counter() - self.since, 1e-9)


def progress_line(step: int, total: int, steps_per_second: float | None, images_per_second: float | None,
                  width: int = 20) -> str:
    """`[=====>     ] 120/300  40% | 3.10 steps/s, 24.8 img/s, ETA 0:00:58` (speed and ETA `--` until
    measured)."""
    done = min(step / max(total, 1), 1.0)
    filled = int(done * width)
    bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
    if steps_per_second is None:
        return f"[{bar}] {step}/{total} {done:4.0%} | -- steps/s, -- img/s, ETA --"
    eta = int(round((total - step) / max(steps_per_second, 1e-9)))
    return (f"[{bar}] {step}/{total} {done:4.0%} | {steps_per_second:.2f} steps/s, "
            f"{images_per_second:.1f} img/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
