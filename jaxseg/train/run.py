"""Config files -> a trained and evaluated model: what `tools/train.py` runs, usable from Python too."""
from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import ml_collections

from jaxseg.losses.mask_classification import SetLossConfig
from jaxseg.train.tasks import EomtTask
from jaxseg.train.trainer import TrainConfig, Trainer

TASKS = ("eomt",)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"no config file at {path!r}")
    module_spec = importlib.util.spec_from_file_location("jaxseg_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg)")
    return module.get_config(arg)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies "a.b=value" overrides (values parsed as Python literals, else kept as strings); an
    unknown key is an error that lists the valid keys at that level."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents + [leaf]:
            keys = sorted(node.keys())
            if part not in keys:
                raise KeyError(f"unknown config key {key!r}: {part!r} is not one of {keys}")
            if part != leaf:
                node = node[part]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[leaf] = value


def scenes_sources(config: ml_collections.ConfigDict, workdir: pathlib.Path):
    """(train, validation) random-access sources of the configured scenes build, built on first use."""
    import tensorflow_datasets as tfds

    from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config

    dataset = config.dataset
    if dataset.name != "jaxseg_scenes":
        raise ValueError(f"dataset {dataset.name!r} is not available yet; only 'jaxseg_scenes'")
    data_dir = pathlib.Path(dataset.data_dir or workdir / "data")
    builder_config = scenes_config(image_size=dataset.image_size, num_train=dataset.num_train,
                                   num_val=dataset.num_val)
    JaxsegScenes(config=builder_config, data_dir=data_dir).download_and_prepare(file_format="array_record")
    return tuple(tfds.data_source(f"jaxseg_scenes/{builder_config.name}", data_dir=data_dir, split=split)
                 for split in ("train", "validation"))


def eomt_task(config: ml_collections.ConfigDict, source, eval_source=None) -> EomtTask:
    model = config.model.to_dict()
    model["encoder"]["posemb_grid"] = tuple(model["encoder"]["posemb_grid"])
    return EomtTask(model=model, source=source, total_steps=config.total_steps, batch_size=config.batch_size,
                    crop_size=config.crop_size, scale_range=tuple(config.scale_range),
                    color_jitter=config.color_jitter, lr=config.lr, warmup=tuple(config.warmup),
                    layer_decay=config.layer_decay, clip_norm=config.clip_norm,
                    loss_config=SetLossConfig(num_points=config.num_points), eval_source=eval_source,
                    eval_batch_size=config.get("eval_batch_size", 8))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} is not available; valid: {TASKS}")
    workdir.mkdir(parents=True, exist_ok=True)
    train, validation = scenes_sources(config, workdir)
    task = eomt_task(config, train, validation)
    trainer = Trainer(task, train_config(config), workdir, config_to_save=json.loads(config.to_json()))
    trainer.run()
    return trainer.eval_results


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    return TrainConfig(total_steps=config.total_steps, seed=config.seed, log_every=config.log_every,
                       checkpoint_every=config.checkpoint_every, eval_every=config.get("eval_every", 0),
                       init_checkpoint=config.get("init_checkpoint", ""),
                       init_into=config.get("init_into", ""), mesh=tuple(map(tuple, config.mesh)),
                       rules=tuple(config.sharding_rules))
