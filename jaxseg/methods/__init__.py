"""Methods as packages: `build(config)` gives the method a config names (`config.method.name`).

Each package holds its method's training side (targets, loss wiring, schedules, augmentation choice,
optimiser recipe) and its predictors; models live in `jaxseg/models/`, losses in `jaxseg/losses/`.
Adding a method is one package and an entry here.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxseg.config import construct
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError

if TYPE_CHECKING:  # a method runs without ml_collections (the GPU benchmark machine has none)
    import ml_collections

# name -> "module:class" of each method's dataclass (imported on use).
METHODS = {
    "eomt": "jaxseg.methods.eomt:EomtMethod",
    "weaktr": "jaxseg.methods.weaktr:WeakTrMethod",
    "segmenter": "jaxseg.methods.segmenter:SegmenterMethod",
    "prompt_cam": "jaxseg.methods.prompt_cam:PromptCamMethod",
    "mae": "jaxseg.methods.mae:MaeMethod",
    "dino": "jaxseg.methods.dino:DinoMethod",
    "setr": "jaxseg.methods.setr:SetrMethod",
    "afa": "jaxseg.methods.afa:AfaMethod",
}


def method_class(name: str) -> type:
    if name not in METHODS:
        raise UserError(f"method.name {name!r} is not available; valid: {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(config: ml_collections.ConfigDict, data: DataConfig | None = None):
    """The method of `config`: `config.method` (less its name) with the `model` and `optimizer` sections,
    the run length and batch size of `config.train` and the data section."""
    section = config.method.to_dict()
    cls = method_class(section.pop("name", None))
    data = data or construct(DataConfig, config.data, where="data")
    return construct(cls, section, where="method", model=config.model.to_dict(),
                     optimizer=construct(cls.optimizer_class, config.optimizer, where="optimizer"),
                     total_steps=config.train.total_steps, batch_size=config.train.batch_size, data=data)
