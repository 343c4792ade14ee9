"""Serving a predictor exported by `jaxseg-export` (`jaxseg.export`, docs/export.md) with jax and numpy
only: this module imports nothing else of jaxseg (no model code, no flax), so a serving image needs just
`pip install jax numpy flatbuffers` and the export directory.

    predictor = load("export_dir")
    outputs = predictor(images)  # uint8 (B, H, W, 3) RGB -> {"semantic": int32 (B, H, W), ...}

An export directory holds the serialized `jax.export` program (`PROGRAM`), its description (`METADATA`:
input, outputs, class names, the predictor and the run it came from) and, when the parameters are not
constants of the program, `params.npz` (one array per parameter, named by its path).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

FORMAT = "jaxseg-export"
FORMAT_VERSION = 1
PROGRAM = "predictor.jaxexport"
METADATA = "metadata.json"


def param_name(path: tuple) -> str:
    """The name of a parameter in params.npz: its path in the parameter tree, joined by "/"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _read_params(path: pathlib.Path, expected: Any) -> Any:
    """The parameter tree the program takes (`expected`: its abstract values), read from the .npz file."""
    with np.load(path) as stored:
        def read(key_path, aval):
            name = param_name(key_path)
            if name not in stored.files:
                raise ValueError(f"{path} holds no parameter {name!r}: it does not belong to this program")
            # numpy stores dtypes it does not know (bfloat16) as raw bytes of the same width.
            array = stored[name]
            array = array.view(aval.dtype) if array.dtype.kind == "V" else array
            if array.shape != aval.shape or array.dtype != aval.dtype:
                raise ValueError(f"parameter {name!r} in {path} is {array.dtype} {array.shape}; the program "
                                 f"takes {aval.dtype} {aval.shape}")
            return jax.device_put(array)
        return jax.tree_util.tree_map_with_path(read, expected)


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class ServedPredictor:
    """`predictor(images)`: the exported predictor on a batch of images, as described by `metadata`
    ("input", "outputs"); returns its outputs (a dict of jax arrays, possibly nested) on the default
    device. Each new batch size compiles once."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        self.metadata = json.loads((directory / METADATA).read_text())
        if self.metadata.get("format") != FORMAT or self.metadata.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{directory / METADATA} is not a {FORMAT} (version <= {FORMAT_VERSION}) description")
        self.exported = jax.export.deserialize(bytearray((directory / PROGRAM).read_bytes()))
        args, _ = jax.tree_util.tree_unflatten(self.exported.in_tree, self.exported.in_avals)
        *params, self.input = args
        self._params = [_read_params(directory / self.metadata["params"], params[0])] if params else []
        self._call = jax.jit(self.exported.call)

    def check(self, images: Any) -> None:
        """Raises ValueError unless `images` is what the program takes (uint8, NHWC, its size and batch)."""
        expected = self.input.shape
        wanted = (f"a {self.input.dtype} array of shape {_shape_text(expected)} (batch, height, width, RGB; "
                  f"values 0-255)")
        if not isinstance(images, (np.ndarray, jax.Array)):
            raise ValueError(f"the images must be {wanted}; got a {type(images).__name__}")
        fits = (images.dtype == self.input.dtype and images.ndim == len(expected) and images.shape[0] >= 1
                and all(not isinstance(e, int) or e == s for e, s in zip(expected, images.shape)))
        if not fits:
            raise ValueError(f"the images must be {wanted}; got {images.dtype} {_shape_text(images.shape)}")

    def __call__(self, images: np.ndarray | jax.Array) -> dict:
        self.check(images)
        return self._call(*self._params, images)


def load(directory: str | pathlib.Path) -> ServedPredictor:
    """The predictor exported into `directory` by `jaxseg-export`."""
    return ServedPredictor(directory)
