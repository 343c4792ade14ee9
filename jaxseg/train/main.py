"""A config -> a trained and evaluated run directory: what tools/train.py runs, usable from Python too.

Every section is built (and so checked), and a rerun's checkpoint checked against the model, before
anything is written: a bad setting leaves the workdir as it was. A fresh run with a `pretrained` section
then takes its encoder from the cache, building it first if needed (`jaxseg.train.pretrained`), as its
init checkpoint. Then the data is opened (the generated scenes are built on first use), the trainer
restores the newest usable checkpoint (or initialises), saves
the config as WORKDIR/config.json, trains and evaluates, and the first
`train.num_overlays` examples of the first evaluation's split are drawn into WORKDIR/overlays/step_<N>/.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxseg import methods
from jaxseg.config import construct
from jaxseg.data.datasets import FirstExamples
from jaxseg.errors import UserError
from jaxseg.evaluate import build_evaluator
from jaxseg.runs import sections
from jaxseg.train.checkpoint import check_resumable
from jaxseg.train.pretrained import PretrainedConfig, pretrained_encoder, pretrained_target
from jaxseg.train.trainer import Evaluation, TrainConfig, Trainer, abstract_train_state
from jaxseg.visualize import PredictionWriter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains and evaluates (module docstring); returns {evaluation name: results, "step": N}."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
    parts, train = sections(config), construct(TrainConfig, config.train, where="train")
    pretrained = construct(PretrainedConfig, config.get("pretrained", {}), where="pretrained")
    if train.requires_init_checkpoint and not (train.init_checkpoint or pretrained.config):
        raise UserError("this recipe fine-tunes pretrained weights: convert them with tools/convert_weights.py "
                        "and set train.init_checkpoint=FILE (or train.requires_init_checkpoint=False to train "
                        "from scratch)")
    # Checked now, built (or found in the cache) once the run is known to start fresh.
    target = pretrained_target(pretrained, train, config.model)
    method = methods.build(config, parts.data)
    mesh = parts.parallel.make_mesh()
    evaluators = {name: build_evaluator(method, e, mesh=mesh, rules=parts.parallel.rules)
                  for name, e in parts.evals.items()}
    _, abstract_state, _ = abstract_train_state(method, train.seed, mesh, parts.parallel.rules)
    resuming = check_resumable(workdir, abstract_state)
    if not resuming and target:
        train = dataclasses.replace(train, init_checkpoint=str(pretrained_encoder(pretrained, *target)))
    if not resuming and train.init_checkpoint and not pathlib.Path(train.init_checkpoint).exists():
        raise FileNotFoundError(f"train.init_checkpoint {train.init_checkpoint} does not exist")
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    splits = [parts.data.train_split] + [e.split for e in parts.evals.values()]
    try:
        sources = parts.data.sources(splits, workdir)
        counts = method.class_counts()
        if counts is not None:
            parts.data.check_classes(sources[parts.data.train_split], **counts)
    except BaseException:
        if created:  # a new run that could not open its data leaves no empty folders behind
            _remove_empty_directories(workdir)
        raise
    saved_config = json.loads(config.to_json())
    evaluations = {name: Evaluation(evaluators[name], sources[e.split], e.every) for name, e in parts.evals.items()}
    trainer = Trainer(method, train, workdir, sources[parts.data.train_split], mesh=mesh,
                      rules=parts.parallel.rules, evaluations=evaluations, config_to_save=saved_config)
    state = trainer.run()
    if train.num_overlays and evaluations:
        first = next(iter(evaluations.values()))
        out_dir = workdir / "overlays" / f"step_{int(state.step)}"
        # Process 0's answer for every host (a host that went its own way would leave the others waiting).
        drawn = bool(multihost_utils.broadcast_one_to_all(np.asarray(out_dir.exists())))
        if not drawn:  # else a rerun found this step finished
            writer = PredictionWriter(out_dir, class_names=parts.data.class_names(method.label_space))
            first.evaluator.run(state.params, FirstExamples(first.source, train.num_overlays), on_prediction=writer)
    return trainer.eval_results


def _remove_empty_directories(directory: pathlib.Path) -> None:
    """Removes `directory` and the directories under it that hold no file (never a file)."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [directory]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
