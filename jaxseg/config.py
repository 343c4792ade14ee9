"""Configs: load `file.py[:arg]` (big_vision's `get_config(arg)`), apply `--set key=value` overrides, and
build objects from config sections.

A config is nested ml_collections sections, each the keyword arguments of one constructor (`construct`):
`method` (the method's dataclass, chosen by `method.name`), `model` (the network), `optimizer` (the
method's recipe), `data` (`jaxseg.data.sources.DataConfig`), `evals` ({name: `EvalConfig`}), `train`
(`jaxseg.train.trainer.TrainConfig`) and `parallel` (`jaxseg.parallel.MeshConfig`). A key that is not a
field of its constructor is an error naming the valid ones, so every setting is spelled once, in the
config, and reachable with `--set`. A field declared with `setting(default, rule)` has its value checked
(`check_rules`, called by the dataclass): a value that breaks the rule is one error naming the key, the
value and the rule.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import numbers
import pathlib
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

try:
    import ml_collections
    _CONFIG_DICTS: tuple[type, ...] = (ml_collections.ConfigDict,)
except ImportError:  # config files need it; building objects from plain dict sections does not (the GPU script)
    _CONFIG_DICTS = ()

from jaxseg.errors import UnknownKeyError, UserError

_SECTION_TYPES = (dict, *_CONFIG_DICTS)

RULES = {
    "finite and >= 0": lambda v: math.isfinite(v) and v >= 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def setting(default: Any = dataclasses.MISSING, rule: str | None = None) -> Any:
    """A dataclass field whose value (each element of a tuple value) must satisfy `RULES[rule]`."""
    if rule is not None and rule not in RULES:
        raise KeyError(f"unknown rule {rule!r}; valid: {sorted(RULES)}")
    return dataclasses.field(default=default, metadata={"rule": rule} if rule else {})


class RuleError(UserError):
    """A setting's value breaks its rule; `key` names it (`construct` prefixes its section)."""

    def __init__(self, key: str, value: Any, rule: str):
        super().__init__(f"{key}={value!r} breaks the rule: must be {rule}")
        self.key, self.value, self.rule = key, value, rule


def check_rules(obj: Any) -> None:
    """Raises `RuleError` for the first field of the dataclass `obj` whose value breaks its `setting` rule
    (None, an unset optional value, passes)."""
    for field in dataclasses.fields(obj):
        rule = field.metadata.get("rule")
        value = getattr(obj, field.name)
        if rule is None or value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and RULES[rule](v) for v in values):
            raise RuleError(f"{type(obj).__name__}.{field.name}", value, rule)


def check_divisible(key: str, value: int, divisor: int, what: str) -> None:
    """Raises `RuleError` unless `divisor` divides `value` (`what` names the divisor, e.g. "the patch size 16")."""
    if value % divisor:
        raise RuleError(key, value, f"divisible by {what}")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"no config file at {path!r}")
    root = _package_root(pathlib.Path(path).resolve().parent)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # `from configs.common import ...` in the repository's configs
    module_spec = importlib.util.spec_from_file_location("jaxseg_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the config file is the user's code: its error is theirs (--debug shows where)
        raise UserError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} defines no get_config(arg)")
    try:
        return module.get_config(arg)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config {spec}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e


def _package_root(directory: pathlib.Path) -> pathlib.Path | None:
    """The directory above the outermost package (a folder with __init__.py) that holds `directory`."""
    if not (directory / "__init__.py").is_file():
        return None
    while (directory.parent / "__init__.py").is_file():
        directory = directory.parent
    return directory.parent


def _parse(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _typed(key: str, old: Any, new: Any) -> Any:
    """`new` checked against the type of the value it replaces (ints widen to floats, lists to tuples)."""
    if old is None or isinstance(old, _SECTION_TYPES):
        return new
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, (int, float)):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool) and (isinstance(old, float) or
                                                                           isinstance(new, int))
        new = float(new) if ok and isinstance(old, float) else new
    elif isinstance(old, (tuple, list)):
        ok = isinstance(new, (tuple, list))
        new = tuple(new) if ok else new
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise UserError(f"--set {key}: {new!r} is not a {type(old).__name__} like the value it replaces "
                        f"({old!r})")
    return new


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies "a.b=value" overrides (values parsed as Python literals, else kept as strings, and checked
    against the type of the value they replace); an unknown key is an error that lists the valid keys at
    that level."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents + [leaf]:
            if not isinstance(node, _SECTION_TYPES):
                raise UnknownKeyError(f"unknown config key {key!r}: {part!r} is below a value, not a section")
            keys = sorted(node.keys())
            if part not in keys:
                raise UnknownKeyError(f"unknown config key {key!r}: {part!r} is not one of {keys}")
            if part != leaf:
                node = node[part]
        node[leaf] = _typed(key, node[leaf], _parse(text))


def _plain(value: Any) -> Any:
    if isinstance(value, _CONFIG_DICTS):
        return value.to_dict()
    return value


def module_settings(section: Any) -> Any:
    """A model section as module keyword arguments: lists (JSON and ConfigDict give them) become tuples,
    recursively, because flax hashes a module's attributes when it is a static argument of jit."""
    section = _plain(section)
    if isinstance(section, Mapping):
        return {key: module_settings(value) for key, value in section.items()}
    if isinstance(section, (list, tuple)):
        return tuple(module_settings(value) for value in section)
    return section


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """`value` converted to what the annotation `hint` asks for: sections to dataclasses, lists to tuples."""
    value = _plain(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return construct(hint, value, where=where)
    if origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if args and args[-1] is not Ellipsis and len(args) == len(value):
                return tuple(_coerce(a, v, where) for a, v in zip(args, value))
            inner = args[0] if args else None
            return tuple(_coerce(inner, v, where) if inner is not None else v for v in value)
    return value


def construct(cls: type, section: Mapping | ml_collections.ConfigDict, *, where: str = "", **context) -> Any:
    """`cls(**section, **context)` for a dataclass `cls`: nested sections become the dataclasses their
    fields are annotated with, lists become tuples, and a key that is not a field is an error that names
    the section (`where`) and the valid keys."""
    section = dict(_plain(section))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        valid = sorted(set(fields) - set(context))
        raise UnknownKeyError(f"unknown key{'s' if len(unknown) > 1 else ''} {unknown} in config section "
                              f"{where or cls.__name__!r}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in section.items()}
    try:
        return cls(**kwargs, **context)
    except RuleError as e:
        if not where or not e.key.startswith(f"{cls.__name__}."):
            raise
        raise RuleError(f"config key {where}.{e.key.split('.', 1)[1]}", e.value, e.rule) from None
