"""Resumable, preemption-safe checkpoints with orbax: train state + grain iterator state + config in one
step directory.

orbax writes every step into a temporary directory and renames it when complete, so a save killed
half-way (even by SIGKILL) leaves the previous checkpoints intact and `latest_step` only ever names
complete ones. Restores always go against an abstract (shape / dtype / sharding) target, so arrays come
back sharded as the running job wants them.

A step whose files were damaged afterwards (a truncated array file, empty or missing metadata, a missing
item) is skipped with a warning that names it and the reason, and the next-newest is restored; nothing
is deleted. Training moves such a step out of `checkpoints/` into `unusable_checkpoints/` once an older
one restored, so that it can save that step again. A checkpoint whose parameters do not fit the model,
or whose other state (optimizer state, step, rng) does not fit the run's (another optimizer layout, e.g.
`optimizer.freeze_encoder` toggled), is not damaged: that is an error at once, since older steps of the
run hold the same state.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import flax.linen
import grain
import jax
import orbax.checkpoint as ocp

from jaxseg.convert.state_dict import WeightConversionError, shape_diff
from jaxseg.errors import UnknownKeyError, UserError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")
UNUSABLE_DIR = "unusable_checkpoints"


class _Damaged(Exception):
    """A step's files cannot be read (as opposed to not fitting the model)."""


@contextlib.contextmanager
def _quiet_unraisable() -> Iterator[None]:
    """orbax reads arrays in coroutines; when one read fails, the others' identical errors are reported
    as 'Exception ignored in <coroutine>' tracebacks. The first is raised and reported; drop the echoes."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()  # the failed coroutines report when they are collected: here, not later
        sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    """The gist of a library's error: its first line, without TensorStore's spec dump."""
    text = str(error).strip().split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
    return text.splitlines()[0] if text else type(error).__name__


def _stored_state(manager: ocp.CheckpointManager, step: int, items: tuple[str, ...]) -> Any:
    """The state metadata of `step` (names, shapes; it holds params) once the step's `items` are there
    and readable."""
    step_dir = pathlib.Path(manager.directory) / str(step)
    missing = [item for item in items if not (step_dir / item).is_dir()]
    if missing:
        raise _Damaged(f"item(s) {missing} are missing")
    try:
        stored = manager.item_metadata(step)["state"]
    except Exception as e:  # orbax reports unreadable metadata as JSON, key or TensorStore errors
        raise _Damaged(f"its metadata cannot be read ({_first_line(e)})") from e
    if stored is None or "params" not in stored:
        raise _Damaged("its state metadata holds no params")
    return stored


def _restore_newest(manager: ocp.CheckpointManager, step: int | None, restore_step: Callable[[int], Any],
                    where: str) -> tuple[int, Any, list[int]]:
    """(step, restore_step(step), skipped damaged newer steps) of `step`, default the newest step that
    restores; `restore_step` raises `_Damaged` for a step that cannot be read."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {where}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {where}; steps: {sorted(steps)}")
    reasons, skipped = [], []
    for candidate in [step] if step is not None else steps:
        try:
            with _quiet_unraisable():
                return candidate, restore_step(candidate), skipped
        except _Damaged as e:
            reasons.append(f"step {candidate}: {e}")
            if step is None:
                log.warning("skipping checkpoint step %d in %s: %s", candidate, where, e)
                skipped.append(candidate)
    raise UserError(f"no usable checkpoint in {where} ({'; '.join(reasons)}); nothing was changed: move the "
                    f"damaged step directories away to start afresh")


def _reader(checkpoints: pathlib.Path) -> ocp.CheckpointManager:
    """A manager that reads a run's checkpoints (params, metadata) and never writes. Every item has its
    handler, so that orbax does not warn about the items it is not asked for."""
    return ocp.CheckpointManager(
        checkpoints, item_names=ITEMS,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False))


class Checkpointer:
    """`CheckpointManager` over `<workdir>/checkpoints` keeping the last `max_to_keep` steps."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        workdir = pathlib.Path(workdir).absolute()
        if workdir.exists() and not workdir.is_dir():
            raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
        self.workdir = workdir
        self.directory = workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
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

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None, *,
                set_aside_damaged: bool = False) -> tuple[Any, dict]:
        """(state, saved config) of `step`, default the newest usable one (module docstring); the state's
        params must fit `abstract_state.params`; `data_iterator` is restored in place. `set_aside_damaged`:
        move the damaged newer steps to WORKDIR/unusable_checkpoints/ (process 0), as training does."""
        needed = ("state", "data") if data_iterator is not None else ("state",)

        def restore_step(candidate: int):
            check_state_fits(abstract_state, _stored_state(self.manager, candidate, needed),
                             f"checkpoint {self.directory}/{candidate}")
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if (self.directory / str(candidate) / "config").is_dir():
                items["config"] = ocp.args.JsonRestore()
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                return self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # the params fit: what fails now is reading the files
                raise _Damaged(f"restoring it failed ({_first_line(e)})") from e

        self.restored_step, restored, skipped = _restore_newest(self.manager, step, restore_step,
                                                                str(self.directory))
        if skipped and set_aside_damaged:
            self._set_aside(skipped)
        return restored["state"], restored.get("config") or {}

    def _set_aside(self, steps: list[int]) -> None:
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            aside = self.workdir / UNUSABLE_DIR
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():  # a step damaged again after an earlier move keeps both
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                (self.directory / str(step)).rename(target)
                log.warning("moved the unusable checkpoint step %d to %s (nothing was deleted)", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxseg_set_aside_checkpoints")
        self.manager.reload()

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_tree_names(expected: Any, actual: Any, what: str, max_lines: int = 12) -> None:
    """Raises with a missing / unexpected / misshaped diff (its first `max_lines` lines) when two parameter
    trees disagree."""
    def shapes(tree):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
        return {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}
    diff = shape_diff(shapes(expected), shapes(actual))
    if diff:
        more = [f"... and {len(diff) - max_lines} more"] if len(diff) > max_lines else []
        raise WeightConversionError(f"{what} does not match the model:\n" + "\n".join(diff[:max_lines] + more))


def _leaf_shapes(tree: Any) -> dict:
    """{"a/0/b": shape} of a tree's leaves, with NamedTuple fields, dict keys and sequence indices named as
    orbax's metadata names them."""
    def part(key) -> str:
        return str(next(getattr(key, a) for a in ("name", "key", "idx") if hasattr(key, a)))
    return {"/".join(part(key) for key in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_state_fits(abstract_state: Any, stored_state: Any, what: str, max_lines: int = 12) -> None:
    """Raises when a checkpoint's state metadata does not fit `abstract_state` (a `TrainState` or a dict
    with "params"): its params (name diff), then everything else it holds (optimizer state, step, rng)."""
    abstract_state = flax.linen.unbox(abstract_state)
    params = abstract_state["params"] if isinstance(abstract_state, dict) else abstract_state.params
    check_tree_names(params, stored_state["params"], what)
    expected, stored = (
        {name: shape for name, shape in _leaf_shapes(tree).items() if not name.startswith("params/")}
        for tree in (abstract_state, {key: stored_state[key] for key in stored_state.keys()}))
    diff = shape_diff(expected, stored)
    if diff:
        more = [f"... and {len(diff) - max_lines} more"] if len(diff) > max_lines else []
        raise UserError(f"{what} holds a train state (optimizer state, step, rng) that does not fit this run's: "
                        "a run resumes with the optimizer layout it started with (e.g. the same "
                        "optimizer.freeze_encoder); to change it, train in a new workdir with "
                        "train.init_checkpoint=<this run> (params only):\n" + "\n".join(diff[:max_lines] + more))


def restore_params(path: str | os.PathLike, abstract_params: Any, shardings: Any = None,
                   step: int | None = None, with_step: bool = False, subtree: str = "") -> Any:
    """Parameters (state["params"]) of step `step` (default: the newest usable) of a run directory or
    checkpoints directory written by `Checkpointer`, checked name by name against `abstract_params` and read straight
    into `shardings` (a tree of shardings like the params; default: one device), so that no host ever
    holds a whole model it shards; other state (optimizer, data iterator) is not read. `subtree`: only the
    "/"-separated subtree of the stored params (e.g. "encoder"), which `abstract_params` then describes.
    `with_step`: (params, the step read)."""
    path = pathlib.Path(path).absolute()
    abstract_params = flax.linen.unbox(abstract_params)  # logical-axis boxes are metadata, not stored
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoint under {path}")
    if shardings is not None:
        abstract_params = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
            flax.linen.unbox(shardings))
    path_names = [name for name in subtree.split("/") if name]
    target = abstract_params
    for name in reversed(path_names):
        target = {name: target}
    target = {"params": target}
    manager = _reader(checkpoints)

    def restore_step(candidate: int):
        where = f"checkpoint {checkpoints}/{candidate}"
        check_tree_names(abstract_params, params_subtree(_stored_state(manager, candidate, ("state",))["params"],
                                                         subtree, where), where)
        try:
            return manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except Exception as e:  # the params fit: what fails now is reading the files
            raise _Damaged(f"restoring it failed ({_first_line(e)})") from e

    try:
        step, restored, _ = _restore_newest(manager, step, restore_step, str(checkpoints))
    finally:
        manager.close()
    params = params_subtree(restored["state"]["params"], subtree, str(checkpoints))
    return (params, step) if with_step else params


def params_subtree(params: Any, subtree: str, where: str) -> Any:
    """The "/"-separated `subtree` of `params` ("" = all of it), or an error naming the names there are."""
    for name in (name for name in subtree.split("/") if name):
        if not isinstance(params, Mapping) or name not in params:
            names = sorted(params) if isinstance(params, Mapping) else []
            raise UnknownKeyError(f"train.init_from={subtree!r}: {where} has no {name!r} (there: {names})")
        params = params[name]
    return params


def check_resumable(workdir: str | os.PathLike, abstract_state: Any) -> bool:
    """Whether the run in `workdir` has a checkpoint to resume from; raises (reading metadata only, writing
    nothing) when the newest readable one holds a state that does not fit `abstract_state`
    (`check_state_fits`), so that a rejected rerun is rejected before it changes the run."""
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    if not checkpoints.is_dir():
        return False
    manager = _reader(checkpoints)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                stored = _stored_state(manager, step, ("state",))
            except _Damaged:
                continue  # the restore skips it with a warning
            check_state_fits(abstract_state, stored,
                             f"checkpoint {checkpoints}/{step} (a run resumes the model it started with; train "
                             f"another one in a new workdir)")
            break
    finally:
        manager.close()
    return bool(steps)


def load_init_params(path: str | os.PathLike, abstract_params: Any, subtree: str = "") -> Any:
    """Parameters to start a run from: the latest params of a jaxseg run (or its checkpoints
    directory), or a converted params file / directory (`jaxseg.convert.params_io`, e.g. a timm ViT for
    an encoder), or their "/"-separated `subtree` (e.g. the "encoder" of a WeakTr run), checked name by
    name against `abstract_params` (a loud diff when they differ)."""
    from jaxseg.convert.params_io import PARAMS_DIR, load_params

    path = pathlib.Path(path)
    if path.is_file() or (path / PARAMS_DIR).is_dir():
        _, params = load_params(path)
        params = params_subtree(params, subtree, f"params {path}")
        check_tree_names(flax.linen.unbox(abstract_params), params, f"params {path}")
        return params
    if not path.is_dir():
        raise FileNotFoundError(f"init checkpoint {path} does not exist")
    return restore_params(path, abstract_params, subtree=subtree)
