"""Resumable, preemption-safe checkpoints with orbax: train state + grain iterator state + config in one
step directory.

orbax writes every step into a temporary directory and renames it when complete, so a save killed
half-way (even by SIGKILL) leaves the previous checkpoints intact and `latest_step` only ever names
complete ones. Restores always go against an abstract (shape / dtype / sharding) target, so arrays come
back sharded as the running job wants them.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import flax
import flax.linen
import grain
import jax
import orbax.checkpoint as ocp

from jaxseg.convert.state_dict import WeightConversionError, shape_diff

ITEMS = ("state", "data", "config")


class Checkpointer:
    """`CheckpointManager` over `<workdir>/checkpoints` keeping the last `max_to_keep` steps."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        workdir = pathlib.Path(workdir).absolute()
        if workdir.exists() and not workdir.is_dir():
            raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
        self.directory = workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            item_handlers={"data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator=None, config: dict | None = None) -> None:
        """Starts saving (asynchronously by default); call `wait_until_finished` before relying on it."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> tuple[Any, dict]:
        """(state, saved config) of `step` (default: the latest); `data_iterator` is restored in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved = {p.name for p in (self.directory / str(step)).iterdir()}
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if "config" in saved:
            items["config"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            if "data" not in saved:
                raise ValueError(f"checkpoint {self.directory}/{step} holds no data-iterator state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {self.directory}/{step} does not fit this model and run: {e}") from e
        return restored["state"], restored.get("config") or {}

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_tree_names(expected: Any, actual: Any, what: str) -> None:
    """Raises with a missing / unexpected / misshaped diff when two parameter trees disagree."""
    def shapes(tree):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
        return {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}
    diff = shape_diff(shapes(expected), shapes(actual))
    if diff:
        raise WeightConversionError(f"{what} does not match the model:\n" + "\n".join(diff))


def restore_params(path: str | os.PathLike, abstract_params: Any, shardings: Any = None,
                   step: int | None = None, with_step: bool = False) -> Any:
    """Parameters (state["params"]) of step `step` (default: the latest) of a run directory or checkpoints
    directory written by `Checkpointer`, checked name by name against `abstract_params` and read straight
    into `shardings` (a tree of shardings like the params; default: one device), so that no host ever
    holds a whole model it shards; other state (optimizer, data iterator) is not read. `with_step`:
    (params, the step read)."""
    path = pathlib.Path(path).absolute()
    abstract_params = flax.linen.unbox(abstract_params)  # logical-axis boxes are metadata, not stored
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    manager = ocp.CheckpointManager(checkpoints, item_names=("state",),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {path}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} under {path}; steps: {sorted(steps)}")
        stored = manager.item_metadata(step)["state"]
        if "params" not in stored:
            raise ValueError(f"checkpoint {checkpoints}/{step} has no 'params' in its state")
        check_tree_names(abstract_params, stored["params"], f"checkpoint {checkpoints}/{step}")
        if shardings is not None:
            abstract_params = jax.tree_util.tree_map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                flax.linen.unbox(shardings))
        target = {"params": abstract_params}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    finally:
        manager.close()
    params = restored["state"]["params"]
    return (params, step) if with_step else params


def load_init_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Parameters to start a run from: the latest params of a jaxseg run (or its checkpoints
    directory), or a converted params file / directory (`jaxseg.convert.params_io`, e.g. a timm ViT for
    an encoder), checked name by name against `abstract_params` (a loud diff when they differ)."""
    from jaxseg.convert.params_io import PARAMS_DIR, load_params

    path = pathlib.Path(path)
    if path.is_file() or (path / PARAMS_DIR).is_dir():
        _, params = load_params(path)
        check_tree_names(flax.linen.unbox(abstract_params), params, f"params {path}")
        return params
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint {path} does not exist")
    return restore_params(path, abstract_params)
