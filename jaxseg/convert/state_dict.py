"""Reading PyTorch state dicts from local files (without pickle) and reporting name/shape diffs."""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxseg.errors import MissingDependencyError, UserError

# Wrappers that training scripts put around a state dict.
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema")


class WeightConversionError(UserError):
    """A weights file cannot be read or does not match the model it is converted to; the message says
    which (for a mismatch, the name diff)."""


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16; params are float32 in jaxseg anyway
        return value.numpy()
    array = np.asarray(value)
    # jnp's dtype lattice knows bfloat16 (numpy's does not).
    return array.astype(np.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array


def unwrap(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Removes checkpoint wrappers ({"model": ...}) and "module." prefixes; converts to numpy."""
    while True:
        wrappers = [k for k in _WRAPPER_KEYS if isinstance(state_dict.get(k), Mapping)]
        if not wrappers:
            break
        state_dict = state_dict[wrappers[0]]
    out = {}
    for key, value in state_dict.items():
        if not hasattr(value, "shape"):
            continue  # training metadata (epoch numbers, ...) stored next to tensors
        out[key.removeprefix("module.")] = _to_numpy(value)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a local `.safetensors`, `.pth`/`.pt`/`.bin` (torch, `weights_only=True`) or `.npz` file
    into {name: float32 numpy array}; an unreadable file or a NaN / Inf weight is a
    `WeightConversionError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".npz"):
        raise UserError(f"unsupported weights file {path!r}: expected .safetensors, .pth, .pt, .bin or .npz")
    state = unwrap(_read(path, suffix))
    non_finite = [name for name, value in state.items()
                  if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]
    if non_finite:
        raise WeightConversionError(f"{path!r} holds NaN or Inf values in {len(non_finite)} tensor(s): "
                                    f"{', '.join(non_finite[:5])}{', ...' if len(non_finite) > 5 else ''}; "
                                    f"converting them would give a model that predicts nothing")
    return state


def _read(path: str, suffix: str) -> Mapping:
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise MissingDependencyError(f"reading {path!r} needs PyTorch (pip install torch); or save the "
                                         f"state dict as .safetensors, which jaxseg reads without it") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError subclasses that vary by version
            raise WeightConversionError(
                f"{path!r} could not be read with torch.load(weights_only=True) (jaxseg never unpickles "
                f"arbitrary objects): {e}. Save only the state dict, e.g. "
                f"torch.save(model.state_dict(), 'weights.pth'), or use .safetensors") from e
        if not isinstance(state, Mapping):
            raise WeightConversionError(f"{path!r} holds a {type(state).__name__}, not a state dict")
        return state
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return dict(f)
        from safetensors import safe_open
        # The flax framework reads bfloat16 too, which plain numpy cannot.
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors' SafetensorError, zipfile's BadZipFile, numpy's ValueError
        raise WeightConversionError(f"cannot read {path!r} as a {suffix} weights file: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def shape_diff(expected: Mapping[str, tuple], actual: Mapping[str, tuple],
               sources: Mapping[str, str] | None = None) -> list[str]:
    """Lines describing missing, unexpected and misshaped names (empty when they agree). `sources` maps a
    renamed entry of `actual` to the checkpoint's own name, shown with it."""
    sources = sources or {}

    def source(name):
        return f"   (checkpoint: {sources[name]})" if sources.get(name, name) != name else ""

    lines = []
    for name in sorted(set(expected) - set(actual)):
        lines.append(f"  - missing     {name} {tuple(expected[name])}")
    for name in sorted(set(actual) - set(expected)):
        lines.append(f"  + unexpected  {name} {tuple(actual[name])}{source(name)}")
    for name in sorted(set(expected) & set(actual)):
        if tuple(expected[name]) != tuple(actual[name]):
            lines.append(f"  ~ shape       {name}: got {tuple(actual[name])}, "
                         f"expected {tuple(expected[name])}{source(name)}")
    return lines
