"""Saving and loading converted ViT params together with their model config.

Two formats:
  msgpack  one file: {"config": JSON text, "params": tree} (flax.serialization), written atomically;
  orbax    a directory: `params/` (orbax StandardCheckpointer) and `model_config.json`.
Existing outputs are never overwritten unless asked.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.config import module_settings
from jaxseg.errors import UserError

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
FORMATS = ("msgpack", "orbax")


def _json_config(config: Mapping[str, Any]) -> str:
    config = dict(config)
    for key in ("dtype", "param_dtype"):
        if key in config:
            config[key] = jnp.dtype(config[key]).name
    return json.dumps(config, indent=1, sort_keys=True)


def _parse_config(text: str) -> dict:
    config = json.loads(text)
    for key in ("dtype", "param_dtype"):
        if key in config:
            config[key] = jnp.dtype(config[key])
    return module_settings(config)


def format_for(path: str | os.PathLike) -> str:
    """msgpack for a `.msgpack` file name, orbax (a directory) otherwise."""
    return "msgpack" if os.fspath(path).endswith(".msgpack") else "orbax"


def save_params(path: str | os.PathLike, config: Mapping[str, Any], params: Any,
                fmt: str | None = None, overwrite: bool = False) -> pathlib.Path:
    path = pathlib.Path(path).absolute()
    fmt = fmt or format_for(path)
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {fmt!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output or pass overwrite=True "
                              f"(--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(np.asarray, params)
    if fmt == "msgpack":
        payload = flax.serialization.msgpack_serialize({"config": _json_config(config), "params": params})
        # Write next to the target and rename, so an interrupted write never leaves a partial file.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            f.write(payload)
        os.replace(f.name, path)
        return path
    import orbax.checkpoint as ocp

    # Build the directory beside the target and swap it in at the end: a failure half-way never
    # leaves a partial checkpoint, nor destroys the one being replaced.
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    (staging / CONFIG_FILE).write_text(_json_config(config))
    if path.exists():
        retired = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.")) / "x"
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired.parent)
    else:
        staging.rename(path)
    return path


def load_params(path: str | os.PathLike) -> tuple[dict, Any]:
    """(model config, params) from a file or directory written by `save_params`."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no converted params at {path}")
    if path.is_file():
        try:
            payload = flax.serialization.msgpack_restore(path.read_bytes())
            return _parse_config(payload["config"]), payload["params"]
        except Exception as e:
            raise UserError(f"{path} is not a jaxseg msgpack params file: {e}") from e
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise UserError(f"{path} is not a jaxseg orbax params directory: expected {CONFIG_FILE} and "
                        f"{PARAMS_DIR}/ inside")
    import orbax.checkpoint as ocp

    from jaxseg.convert.timm import abstract_params

    config = _parse_config((path / CONFIG_FILE).read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / PARAMS_DIR, abstract_params(config))
    return config, params
