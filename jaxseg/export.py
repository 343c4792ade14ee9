"""A run's predictor as a serialized `jax.export` program (StableHLO) for serving without jaxseg
(`jaxseg.serving`, docs/export.md).

The program is the predictor's own `predict`, as the evaluator runs it, for one input size: it takes a
batch of uint8 (B, H, W, 3) RGB images and returns `predict`'s outputs with their maps cut to (H, W). What
the host side (`prepare`) gives `predict` besides the image depends only on the image size (resize
matrices, window positions), so it is computed once here and becomes constants of the program; where
`prepare` places the pixels (on the canvas, transposed for tall images) becomes one gather. `predict`
runs on one image at a time, vmapped over the batch. The
parameters are constants of the program ("inline") or an input read from params.npz ("npz"). B is fixed,
or symbolic ("b": any batch size).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError
from jaxseg.inference.canvas import fitted_settings
from jaxseg.serving import FORMAT, FORMAT_VERSION, METADATA, PROGRAM, param_name

PARAMS_FILE = "params.npz"
PARAMS_MODES = ("inline", "npz")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
BATCH_DIM = "b"


def predictor_settings(run, size: tuple[int, int], kind: str | None = None,
                       evaluation: str | None = None) -> tuple[str, dict, str | None]:
    """(kind, settings, the evaluation they come from) of the predictor to export: those of `evaluation`
    (default: the first of the run's evaluations whose predictor is `kind`, or the first evaluation when
    `kind` is None), or every default of `kind` where no evaluation uses it; sized for images of `size`
    (the canvas is `size`). Predictors steered by image-level labels use the predicted ones: a served
    image has none."""
    if evaluation is not None or kind is None:
        config = run.eval_config(evaluation)
        evaluation = evaluation or next(iter(run.parts.evals))
        settings = dict(config.predictor)
        if kind is not None and kind != settings["kind"]:
            raise UserError(f"evaluation {evaluation!r} uses the {settings['kind']!r} predictor, not {kind!r}; "
                            "leave out --eval to export another kind")
    else:
        evaluation = next((name for name, config in run.parts.evals.items() if config.predictor["kind"] == kind),
                          None)
        if evaluation:
            settings = dict(run.parts.evals[evaluation].predictor)
        else:  # the defaults, as a config's predictor section lists them (an unknown kind fails here)
            signature = inspect.signature(type(run.method.predictor(kind)))
            settings = {"kind": kind, **{name: p.default for name, p in signature.parameters.items()
                                         if p.default is not inspect.Parameter.empty}}
    kind = settings.pop("kind")
    if "canvas" in settings:
        settings["canvas"] = tuple(size)
    if "labels" in settings:
        settings["labels"] = "predicted"
    return kind, settings, evaluation


def sized_predictor(method, kind: str, settings: dict, size: tuple[int, int]) -> tuple[Any, dict]:
    """(predictor, its settings) for images of `size`: `settings` where they hold such an image, else
    with their window and aspect bounds raised to hold it (`fitted_settings`, which may overshoot: unused
    windows still cost their forward)."""
    predictor = method.predictor(kind, **settings)
    try:
        predictor.prepare({"image": np.zeros((*size, 3), np.uint8)})
    except UserError:
        settings = fitted_settings(settings, [size])
        predictor = method.predictor(kind, **settings)
    return predictor, settings


def serving_function(predictor, size: tuple[int, int]):
    """fn(params, images uint8 (B, H, W, 3)) -> `predictor.predict`'s outputs, maps at the canvas cut to
    (H, W) = `size` (module docstring)."""
    height, width = size
    # An image whose pixels hold their own flat index + 1 shows where `prepare` puts each of them (0: padding).
    placed = predictor.prepare({"image": np.arange(1, height * width * 3 + 1).reshape(height, width, 3)})
    placement = placed.pop("image")
    probe = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    prepared = predictor.prepare({"image": probe})
    placed_probe = np.concatenate([[0], probe.ravel()])[placement]
    if (sorted(prepared) != sorted([*placed, "image"]) or not np.array_equal(prepared["image"], placed_probe)
            or not all(np.array_equal(value, prepared[key]) for key, value in placed.items())):
        raise UserError(f"the {type(predictor).__name__}'s inputs depend on the pixels' values beyond the image "
                        "itself: it cannot be exported for a fixed input size")
    canvas = tuple(predictor.canvas({"image": probe}))

    def crop(x):
        return x[..., :height, :width] if x.ndim >= 2 and tuple(x.shape[-2:]) == canvas else x

    # One image at a time under vmap: the size-only inputs stay unbatched constants. Broadcast over the
    # batch they would be copied B times, and XLA:CPU (jaxlib 0.10.2) miscompiles a batched matmul whose
    # operand is a broadcast when it fuses it with a reduction: Segmenter's resize back gave wrong maps.
    def one(params, image):
        pixels = jnp.concatenate([jnp.zeros((1,), image.dtype), image.ravel()])
        inputs = {key: value[None] for key, value in placed.items()}
        inputs["image"] = jnp.take(pixels, placement)[None]
        return jax.tree_util.tree_map(lambda x: crop(x[0]), predictor.predict(params, inputs))

    def fn(params, images):
        return jax.vmap(one, in_axes=(None, 0))(params, images)
    return fn


def export_predictor(predictor, params: Any, size: tuple[int, int], *, batch_size: int | None = None,
                     params_mode: str = "inline", platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
    """The `jax.export` program of `serving_function` for `batch_size` images (None: a symbolic batch
    size), the parameters `params` as constants ("inline") or as its first argument ("npz")."""
    fn = serving_function(predictor, size)
    batch = batch_size if batch_size is not None else jax.export.symbolic_shape(BATCH_DIM)[0]
    images = jax.ShapeDtypeStruct((batch, *size, 3), jnp.uint8)
    params = jax.device_get(params)
    if params_mode == "inline":
        return jax.export.export(jax.jit(functools.partial(fn, params)), platforms=tuple(platforms))(images)
    abstract = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(abstract, images)


def _shape(shape: tuple) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


@dataclasses.dataclass
class Export:
    """A serialized program, its metadata and, for "npz", its parameters by name; `save` writes them."""
    program: bytes
    metadata: dict
    params: dict[str, np.ndarray] | None

    def save(self, directory: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
        directory = pathlib.Path(directory)
        check_destination(directory, overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROGRAM).write_bytes(self.program)
        (directory / METADATA).write_text(json.dumps(self.metadata, indent=1))
        if self.params is not None:
            np.savez(directory / PARAMS_FILE, **self.params)
        else:  # a replaced npz export's parameters would belong to no program
            (directory / PARAMS_FILE).unlink(missing_ok=True)
        return directory


def check_destination(directory: str | pathlib.Path, overwrite: bool) -> None:
    """An export may go to `directory`: it does not exist, is empty, or `overwrite` allows replacing."""
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"the export destination {directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise UserError(f"{directory} is not empty; pass --overwrite (overwrite=True) to replace the export in it")


def export_run(run, size: int | Sequence[int], *, kind: str | None = None, evaluation: str | None = None,
               batch_size: int | None = None, params_mode: str = "inline",
               platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Export:
    """The export of the predictor of a loaded run (`jaxseg.runs.load_run`) for images of `size` ((H, W)
    or a square side), chosen by `kind` and `evaluation` (`predictor_settings`); `batch_size` images per
    call (None: any); the parameters inline or in params.npz (`params_mode`); lowered for `platforms`."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise UserError(f"the input size must be one side or (height, width), positive integers; got {size}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"the batch size must be at least 1 (or None: any), got {batch_size}")
    if params_mode not in PARAMS_MODES:
        raise UserError(f"params_mode must be one of {PARAMS_MODES}, got {params_mode!r}")
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise UserError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
    kind, settings, evaluation = predictor_settings(run, size, kind, evaluation)
    predictor, settings = sized_predictor(run.method, kind, settings, size)
    host_params = jax.device_get(run.params)
    exported = export_predictor(predictor, host_params, size, batch_size=batch_size, params_mode=params_mode,
                                platforms=platforms)
    params = None
    if params_mode == "npz":
        params = {param_name(path): np.asarray(leaf)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(host_params)}
    outputs = {param_name(path): {"shape": _shape(aval.shape), "dtype": str(aval.dtype)}
               for path, aval in jax.tree_util.tree_leaves_with_path(exported.out_tree.unflatten(exported.out_avals))}
    method = run.method
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "jaxseg_version": importlib.metadata.version("jaxseg"), "jax_version": jax.__version__,
        "program": PROGRAM, "params": PARAMS_FILE if params_mode == "npz" else "inline",
        "platforms": list(exported.platforms),
        "input": {"shape": _shape(exported.in_avals[-1].shape), "dtype": "uint8", "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255]},
        "outputs": outputs,
        "method": run.config.method.name,
        "predictor": {"kind": kind, "settings": settings},
        "run": {"workdir": str(pathlib.Path(run.workdir).absolute()), "step": run.step, "evaluation": evaluation},
        "label_space": method.label_space,
        "class_names": run.parts.data.class_names(method.label_space),
    }
    if hasattr(method, "is_thing"):  # panoptic segments: which classes are things
        metadata["is_thing"] = [bool(t) for t in method.is_thing]
    return Export(bytes(exported.serialize()), metadata, params)
