"""A run directory without the trainer (nothing here imports it): its config, a chosen or the latest step,
the parameters restored straight into their shardings on the run's mesh, and evaluators built from it.
jaxseg-eval, jaxseg-predict and jaxseg-pseudo-labels work through this module.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections

from jaxseg import methods, parallel
from jaxseg.config import apply_overrides, construct
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UnknownKeyError, UserError
from jaxseg.evaluate import EvalConfig, Evaluator, build_evaluator
from jaxseg.parallel import MeshConfig
from jaxseg.train.checkpoint import restore_params


@dataclasses.dataclass
class Sections:
    """The sections of a config that a run's predictions need, as their objects."""
    data: DataConfig
    evals: dict[str, EvalConfig]
    parallel: MeshConfig


def sections(config: ml_collections.ConfigDict) -> Sections:
    evals = {name: construct(EvalConfig, section, where=f"evals.{name}")
             for name, section in config.get("evals", {}).items()}
    return Sections(data=construct(DataConfig, config.data, where="data"), evals=evals,
                    parallel=construct(MeshConfig, config.parallel, where="parallel"))


@dataclasses.dataclass
class Run:
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    parts: Sections
    method: Any
    mesh: jax.sharding.Mesh
    step: int
    params: Any

    def evaluator(self, name: str | None = None, *, split: str | None = None, metrics: dict | None = None,
                  **predictor_settings) -> Evaluator:
        """The evaluator of evaluation `name` (default: the first the config lists), its predictor settings
        overridden by `predictor_settings`, its metrics by `metrics` ({} for predictions only)."""
        config = self.eval_config(name, split=split)
        if metrics is not None:
            config = dataclasses.replace(config, metrics=metrics)
        return build_evaluator(self.method, config, mesh=self.mesh, rules=self.parts.parallel.rules,
                               **predictor_settings)

    def eval_config(self, name: str | None = None, *, split: str | None = None) -> EvalConfig:
        if not self.parts.evals:
            raise UserError(f"the run {self.workdir} configures no evaluation (config.evals is empty)")
        name = name or next(iter(self.parts.evals))
        if name not in self.parts.evals:
            raise UnknownKeyError(f"the run configures no evaluation {name!r}; valid: {sorted(self.parts.evals)}")
        config = self.parts.evals[name]
        return dataclasses.replace(config, split=split) if split else config

    def source(self, split: str):
        return self.parts.data.sources([split], self.workdir)[split]


def run_config(workdir: str | pathlib.Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """The config of the run in `workdir` with `overrides` ("key=value") applied (not to the model, which
    the checkpoint fixes)."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} holds no config.json: not a run directory of jaxseg-train")
    model_overrides = [o for o in overrides if o.partition("=")[0].split(".")[0] == "model"]
    if model_overrides:
        raise UserError(f"{model_overrides}: the model is the checkpoint's; a loaded run cannot change it")
    try:
        config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): the run's config is damaged") from e
    apply_overrides(config, list(overrides))
    return config


def load_run(workdir: str | pathlib.Path, *, step: int | None = None, overrides: list[str] = ()) -> Run:
    """The run written by jaxseg-train into `workdir` at `step` (default: the newest usable checkpoint),
    with `overrides` applied to its config (`run_config`)."""
    workdir = pathlib.Path(workdir)
    config = run_config(workdir, overrides)
    parts = sections(config)
    method = methods.build(config, parts.data)
    mesh = parts.parallel.make_mesh()
    boxed = jax.eval_shape(method.init_params, jax.random.PRNGKey(0))
    shardings = parallel.tree_shardings(boxed, mesh, parts.parallel.rules)
    params, restored_step = restore_params(workdir, boxed, shardings, step=step, with_step=True)
    return Run(workdir, config, parts, method, mesh, restored_step, params)
