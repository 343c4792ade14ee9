"""Pretrained encoders built on first use and cached: a config's `pretrained` section names a pretraining
config (e.g. MAE on the generated scenes, `configs/pretrain/scenes_mae.py`); the first run that needs it
trains it and keeps its encoder, every later run (of any config that names the same pretraining) reuses
it.

The cache is `$JAXSEG_CACHE_DIR/pretrained/` (default `~/.cache/jaxseg/pretrained/`), one directory per
resolved pretraining config, named after its file, argument and a hash of the config (after
`overrides`): `scenes_mae-runlocal-<hash>/`. It holds `encoder.msgpack` (the encoder's ViT settings and
params, `jaxseg.convert.params_io`), the pretraining's `config.json`, `eval.json` and
`train_metrics.jsonl`. A build runs in a hidden staging directory beside it and is renamed into place only
when it is complete, so an interrupted build leaves no entry; of two concurrent builds the first rename
wins and the other is discarded.

The cached encoder loads through `train.init_checkpoint` / `train.init_into` like any converted params
file: where the model's encoder (the model section at `train.init_into`) has the same parameter tree,
the file itself; where it differs only in layout (WeakTr's one class token per class, no final norm, a
position grid of another size), a copy converted once by `jaxseg.convert.timm` (the class token and its
position entry repeated, the final norm dropped, the position embedding resampled) and kept in the entry's
`adapted/`. Settings that make it another network (width, depth, heads, MLP, patch size, registers, ...)
must agree, which is checked before anything is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Mapping

import jax
import ml_collections

from jaxseg.config import apply_overrides, load_config, module_settings
from jaxseg.convert.params_io import load_params, save_params
from jaxseg.convert.timm import abstract_params, from_timm, to_timm
from jaxseg.errors import UserError
from jaxseg.methods import method_class
from jaxseg.models.vit import ViT
from jaxseg.train.trainer import TrainConfig

CACHE_ENV = "JAXSEG_CACHE_DIR"
ENCODER_FILE = "encoder.msgpack"
# What an entry keeps of its pretraining run (the checkpoints and the generated data go).
KEPT_FILES = ("config.json", "eval.json", "train_metrics.jsonl")
# ViT settings that make the pretrained encoder another network: the pretraining and the model agree.
SAME_NETWORK = ("width", "depth", "num_heads", "mlp_dim", "mlp_type", "patch_size", "in_channels",
                "num_registers", "qkv_bias", "key_bias", "layerscale_init", "layernorm_eps", "pre_norm",
                "rope_base")
# Layout settings the conversion adapts (`jaxseg.convert.timm.from_timm`).
ADAPTED = ("num_cls_tokens", "final_norm", "posemb_grid", "posemb_covers_prefix")
_REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """A config's `pretrained` section: a fresh run starts from the encoder pretrained by the config
    `config` ("path/to/config.py:arg"; a relative path is looked up in the working directory, then in the
    jaxseg repository; "" = no pretrained encoder) with `overrides` ("key=value", as --set) applied, built on
    first use and cached (`jaxseg.train.pretrained`); it is placed at `train.init_into`."""
    config: str = ""
    overrides: tuple[str, ...] = ()


def cache_root() -> pathlib.Path:
    """$JAXSEG_CACHE_DIR/pretrained (default ~/.cache/jaxseg/pretrained)."""
    base = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "jaxseg"
    return pathlib.Path(base) / "pretrained"


def _config_path(spec: str) -> tuple[pathlib.Path, str]:
    path, _, arg = spec.partition(":")
    path = pathlib.Path(path)
    if not path.is_file() and not path.is_absolute() and (_REPOSITORY / path).is_file():
        path = _REPOSITORY / path
    return path, arg


def pretraining_config(pretrained: PretrainedConfig) -> ml_collections.ConfigDict:
    """The resolved pretraining config (its file's get_config(arg) with the overrides)."""
    path, arg = _config_path(pretrained.config)
    config = load_config(f"{path}:{arg}")
    apply_overrides(config, list(pretrained.overrides))
    return config


def entry_directory(pretrained: PretrainedConfig, config: ml_collections.ConfigDict) -> pathlib.Path:
    """The cache entry of a resolved pretraining config: <root>/<file stem>-<arg>-<12 hex digits>."""
    path, arg = _config_path(pretrained.config)
    digest = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{arg.replace(',', '_') or 'default'}-{digest}"


def _vit_settings(section: Mapping) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(ViT) if f.name not in ("parent", "name")}
    return {**defaults, **module_settings(section)}


def check_fits(source: Mapping, target: Mapping, where: str) -> None:
    """Raises unless the encoder of `source` (ViT settings of the pretraining) can initialise the one of
    `target` (`where` names it): the same network up to the `ADAPTED` layout."""
    source, target = _vit_settings(source), _vit_settings(target)
    differ = [f"{key} {source[key]!r} vs {target[key]!r}" for key in SAME_NETWORK if source[key] != target[key]]
    if target["num_cls_tokens"] != source["num_cls_tokens"] and source["num_cls_tokens"] != 1:
        differ.append(f"num_cls_tokens {source['num_cls_tokens']} vs {target['num_cls_tokens']} (only a single "
                      f"class token can be repeated)")
    if target["final_norm"] and not source["final_norm"]:
        differ.append("final_norm False vs True (the pretraining has no final norm to load)")
    if differ:
        raise UserError(f"the pretrained encoder does not fit {where}: " + "; ".join(differ)
                        + " (pretraining vs model; give both the same encoder settings)")


def pretrained_target(pretrained: PretrainedConfig, train: TrainConfig, model: Mapping) -> tuple[Mapping, str] | None:
    """(the model's encoder settings, their config key) that `pretrained` initialises, after checking that
    the pretraining's encoder fits them (reading configs only); None without a `pretrained.config`. `train`:
    the run's `TrainConfig` (its `init_into` names the encoder; its `init_checkpoint` must be unset)."""
    if not pretrained.config:
        return None
    if train.init_checkpoint or train.init_from:
        raise UserError(f"train.init_checkpoint={train.init_checkpoint!r} / train.init_from={train.init_from!r} and "
                        f"pretrained.config={pretrained.config!r} both name initial weights: set one of them to ''")
    encoder = model
    for part in filter(None, train.init_into.split("/")):
        if part not in encoder:
            raise UserError(f"pretrained.config initialises train.init_into={train.init_into!r}, which is not a "
                            f"section of the model config")
        encoder = encoder[part]
    where = "model." + train.init_into.replace("/", ".") if train.init_into else "model"
    config = pretraining_config(pretrained)
    if not hasattr(method_class(config.method.name), "encoder_subtree"):
        raise UserError(f"pretrained.config {pretrained.config!r} trains method {config.method.name!r}, which is not "
                        f"a pretraining method (its params name no encoder_subtree to keep)")
    check_fits(config.model.encoder, encoder, where)
    return encoder, where


def pretrained_encoder(pretrained: PretrainedConfig, target: Mapping, where: str = "the model's encoder"
                       ) -> pathlib.Path:
    """A params file of the pretrained encoder in the layout of ViT(**target): from the cache, after
    building the entry if it holds none (said on the console either way)."""
    config = pretraining_config(pretrained)
    source = module_settings(config.model.encoder)
    check_fits(source, target, where)
    entry = entry_directory(pretrained, config)
    if (entry / ENCODER_FILE).is_file():
        _say(f"using cached pretrained backbone {entry}")
    else:
        build(pretrained, config, entry)
    return adapted(entry, target)


def build(pretrained: PretrainedConfig, config: ml_collections.ConfigDict, entry: pathlib.Path) -> None:
    """Trains the pretraining `config` in a staging directory and renames it to `entry` once complete."""
    from jaxseg.runs import load_run
    from jaxseg.train.main import train_and_evaluate

    if jax.process_count() > 1:
        raise UserError(f"the pretrained backbone {pretrained.config} is not cached at {entry}: build it once on "
                        f"a single host (the same command there) and share {cache_root()} with every host")
    _say(f"building pretrained backbone {pretrained.config} (once; cached at {entry})")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.building-"))
    try:
        run = staging / "run"
        train_and_evaluate(config, run)
        encoder = jax.device_get(_subtree(load_run(run)))
        save_params(staging / ENCODER_FILE, module_settings(config.model.encoder), encoder)
        for name in KEPT_FILES:
            if (run / name).is_file():
                (run / name).rename(staging / name)
        shutil.rmtree(run)
        try:
            staging.rename(entry)
        except OSError:
            if not (entry / ENCODER_FILE).is_file():
                raise
            _say(f"another process cached the pretrained backbone first; using {entry}")
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _subtree(run) -> dict:
    params = run.params
    for part in run.method.encoder_subtree.split("/"):
        params = params[part]
    return params


def adapted(entry: pathlib.Path, target: Mapping) -> pathlib.Path:
    """The entry's encoder file when ViT(**target) has its parameter tree, else its conversion to that
    layout (made once, kept in `entry/adapted/`)."""
    source, params = load_params(entry / ENCODER_FILE)
    source, target = _vit_settings(source), _vit_settings(target)
    shapes = [jax.tree_util.tree_map(lambda a: a.shape, abstract_params(c)) for c in (source, target)]
    if shapes[0] == shapes[1]:
        return entry / ENCODER_FILE
    layout = {key: target[key] for key in ADAPTED}
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:12]
    path = entry / "adapted" / f"{digest}.msgpack"
    if not path.is_file():
        config, converted = from_timm(to_timm(params, source), num_heads=source["num_heads"],
                                      source_grid=source["posemb_grid"],
                                      source_posemb_covers_prefix=source["posemb_covers_prefix"], **layout)
        save_params(path, config, converted, overwrite=True)
    return path


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
