"""Config files -> a trained and evaluated model: what `tools/train.py` runs, usable from Python too."""
from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import jax
import ml_collections
from jax.experimental import multihost_utils

from jaxseg.data.datasets import manual_sources
from jaxseg.losses.mask_classification import SetLossConfig
from jaxseg.train.checkpoint import restore_params
from jaxseg.train.tasks import EomtTask
from jaxseg.train.trainer import TrainConfig, Trainer
from jaxseg.train.wsss_tasks import PseudoLabelSource, SegmenterTask, WeakTrCamTask
from jaxseg.visualize import source_items, write_predictions


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


def dataset_sources(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """{split: random-access source} of the configured dataset's train and eval splits. The generated
    scenes are built on first use (in `dataset.data_dir`, default WORKDIR/data); the other datasets are
    read from their prepared TFDS build (`jaxseg.data.datasets`)."""
    dataset = config.dataset
    splits = (dataset.train_split, dataset.eval_split)
    if dataset.name != "jaxseg_scenes":
        return manual_sources(dataset.name, dataset.data_dir, splits, manual_dir=dataset.get("manual_dir"))
    import tensorflow_datasets as tfds

    from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config

    data_dir = pathlib.Path(dataset.data_dir or workdir / "data")
    builder_config = scenes_config(image_size=dataset.image_size, num_train=dataset.num_train,
                                   num_val=dataset.num_val, hue_spread=dataset.get("hue_spread"),
                                   saturation_range=dataset.get("saturation_range"))
    JaxsegScenes(config=builder_config, data_dir=data_dir).download_and_prepare(file_format="array_record")
    return {split: tfds.data_source(f"jaxseg_scenes/{builder_config.name}", data_dir=data_dir, split=split)
            for split in splits}


def _model(config: ml_collections.ConfigDict) -> dict:
    model = config.model.to_dict()
    model["encoder"]["posemb_grid"] = tuple(model["encoder"]["posemb_grid"])
    return model


def eomt_task(config: ml_collections.ConfigDict, sources: dict) -> EomtTask:
    return EomtTask(model=_model(config), source=sources.get(config.dataset.train_split),
                    total_steps=config.total_steps, batch_size=config.batch_size,
                    crop_size=config.crop_size, segmentation=config.segmentation,
                    num_things=config.num_things, scale_range=tuple(config.scale_range),
                    color_jitter=config.color_jitter, max_segments=config.max_segments, lr=config.lr,
                    warmup=tuple(config.warmup), layer_decay=config.layer_decay, clip_norm=config.clip_norm,
                    loss_config=SetLossConfig(num_points=config.num_points),
                    eval_source=sources.get(config.dataset.eval_split))


def weaktr_cam_task(config: ml_collections.ConfigDict, sources: dict) -> WeakTrCamTask:
    return WeakTrCamTask(model=_model(config), source=sources.get(config.dataset.train_split),
                         total_steps=config.total_steps, steps_per_epoch=config.steps_per_epoch,
                         batch_size=config.batch_size, crop_size=config.crop_size, lr=config.lr,
                         weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
                         warmup_lr=config.warmup_lr, min_lr=config.min_lr,
                         ground_truth=config.dataset.ground_truth,
                         eval_source=sources.get(config.dataset.eval_split), eval_scales=tuple(config.eval_scales),
                         augmentation=config.augmentation, refine_cams=config.refine_cams)


def segmenter_task(config: ml_collections.ConfigDict, sources: dict) -> SegmenterTask:
    train = sources.get(config.dataset.train_split)
    ground_truth = config.dataset.ground_truth
    if config.pseudo_labels_dir and train is not None:
        train, ground_truth = PseudoLabelSource(train, config.pseudo_labels_dir), "wsss"
    elif config.clipping and train is not None:
        raise ValueError("the gradient-clipping loss is for pseudo-labels: set pseudo_labels_dir (written by "
                         "tools/make_pseudo_labels.py) or clipping=False to train on ground truth")
    return SegmenterTask(model=_model(config), source=train, total_steps=config.total_steps,
                         batch_size=config.batch_size, crop_size=config.crop_size, base_size=config.base_size,
                         num_foreground=config.num_foreground, lr=config.lr, min_lr=config.min_lr,
                         encoder_multiplier=config.encoder_multiplier, optimizer_name=config.optimizer,
                         warmup_steps=config.warmup_steps, ratio_range=tuple(config.ratio_range),
                         photometric=config.photometric, clipping=config.clipping,
                         clip_cell_size=config.clip_cell_size, start_value=config.start_value,
                         ground_truth=ground_truth, readout_weights=tuple(config.readout_weights),
                         eval_ground_truth=config.dataset.ground_truth,
                         eval_source=sources.get(config.dataset.eval_split))


TASKS = {"eomt": eomt_task, "weaktr_cam": weaktr_cam_task, "segmenter": segmenter_task}


def build_task(config: ml_collections.ConfigDict, sources: dict):
    """The config's task over `sources` ({split: source}); a split not in `sources` leaves the task
    without that data ({} gives a task that can only init, restore and predict)."""
    return _task_builder(config)(config, sources)


def _task_builder(config: ml_collections.ConfigDict):
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} is not available; valid: {sorted(TASKS)}")
    return TASKS[config.task]


def load_run(workdir: str | pathlib.Path, sources: dict | None = None):
    """(config, task, params) of a run directory written by `train_and_evaluate`: its saved config, the
    task built over `sources` (default none) and the params of the latest checkpoint."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} holds no config.json: not a run directory of tools/train.py")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    task = build_task(config, sources or {})
    abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    return config, task, restore_params(workdir, abstract)


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    if config.get("requires_init_checkpoint") and not config.init_checkpoint:
        raise ValueError("this recipe fine-tunes pretrained weights: convert them with "
                         "tools/convert_weights.py and set init_checkpoint=FILE (or "
                         "requires_init_checkpoint=False to train from scratch)")
    return TrainConfig(total_steps=config.total_steps, seed=config.seed, log_every=config.log_every,
                       checkpoint_every=config.checkpoint_every, eval_every=config.get("eval_every", 0),
                       init_checkpoint=config.get("init_checkpoint", ""),
                       init_into=config.get("init_into", ""), mesh=tuple(map(tuple, config.mesh)),
                       rules=tuple(config.sharding_rules))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
    _task_builder(config)  # a bad task name fails before any dataset is read or built
    trainer_config = train_config(config)  # its checks fail before any dataset is read or built
    workdir.mkdir(parents=True, exist_ok=True)
    task = build_task(config, dataset_sources(config, workdir))
    saved_config = json.loads(config.to_json())
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(saved_config, indent=1))
    trainer = Trainer(task, trainer_config, workdir, config_to_save=saved_config)
    state = trainer.run()
    if config.num_overlays and task.eval_source is not None:
        # A collective (every host takes part); then host 0 alone runs the model, on whole params.
        params = multihost_utils.process_allgather(state.params, tiled=True)
        out_dir = workdir / "overlays" / f"step_{int(state.step)}"
        if jax.process_index() == 0 and not out_dir.exists():  # else a rerun found this step finished
            write_predictions(task, params, source_items(task.eval_source, config.num_overlays), out_dir)
    return trainer.eval_results
