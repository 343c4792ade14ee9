"""Meshes and the logical-axis rules that map model axis names onto them.

Model code names logical axes only (see `jaxseg.models.vit`). A config chooses a mesh such as
`[("data", -1), ("fsdp", 1), ("tensor", 1)]` and a rules table; with `DEFAULT_RULES` the mesh shape
alone selects the strategy:

  data-parallel      ("data", n)   batch split, parameters replicated
  FSDP               ("fsdp", n)   batch split, parameters split along `embed`
  tensor-parallel    ("tensor", n) heads and MLP hidden units split, activations too

and any product of them (e.g. data 2 x tensor 4).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

LogicalRules = Sequence[tuple[str, Any]]

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names not listed (kv, norm, act_len, act_embed, act_kv) stay replicated.
DEFAULT_RULES: LogicalRules = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from [(axis name, size)], where one size may be -1 (all remaining devices).

    Axes are `Auto` (GSPMD propagation with `with_sharding_constraint` hints), which is what the
    logical-constraint annotations in the models assume.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh {list(axes)} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                         devices=devices)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` boxes (as produced by
    `jax.eval_shape(model.init, ...)`); unannotated leaves are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch (`act_batch`)."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
        f" over {np.asarray(mesh.devices).size} {mesh.devices.flat[0].platform} devices"
