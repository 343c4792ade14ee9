"""What the trainer, the data pipeline, the evaluator and the tools share about devices: meshes, the
logical-axis rules that map model axis names onto them, shardings, global batches, and joining a
multi-host run.

Model code names logical axes only (see `jaxseg.models.vit`). A config chooses a mesh such as
`[("data", -1), ("fsdp", 1), ("tensor", 1)]` and a rules table; with `DEFAULT_RULES` the mesh shape
alone selects the strategy:

  data-parallel      ("data", n)   batch split, parameters replicated
  FSDP               ("fsdp", n)   batch split, parameters split along `embed`
  tensor-parallel    ("tensor", n) heads and MLP hidden units split, activations too

and any product of them (e.g. data 2 x tensor 4).

`initialize()` joins a multi-process run; call it first thing in a program, before any other JAX
operation. Where the coordinator comes from, first match wins:

  1. the arguments (`coordinator_address`, `num_processes`, `process_id`);
  2. the environment: `JAXSEG_COORDINATOR` ("host:port" of process 0), `JAXSEG_NUM_PROCESSES`,
     `JAXSEG_PROCESS_ID` (each filling only what its argument left unset), or JAX's own
     `JAX_COORDINATOR_ADDRESS`;
  3. a cluster JAX can configure itself (Cloud TPU pod slice, SLURM, Open MPI, Kubernetes with the
     `kubernetes` package), detected exactly as `jax.distributed.initialize()` detects it;
  4. otherwise a single-process run: nothing is started, so a laptop never waits for a coordinator.

Repeated calls are no-ops. After joining, the process logs its index and count and its local and global
device counts; counting devices starts JAX's backends, so configuration that shapes them (`XLA_FLAGS`,
`JAX_PLATFORMS`, `jax_cpu_collectives_implementation`) must be set before the call.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax._src import clusters, xla_bridge
from jax.sharding import Mesh, NamedSharding

from jaxseg.errors import UserError

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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A config's `parallel` section: the mesh [(axis, size)] (one size may be -1: the remaining devices)
    and the logical-axis rules table."""
    mesh: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def __post_init__(self):
        # Rules read back from JSON hold lists where the table has tuples of mesh axes.
        rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules)
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "mesh", tuple((str(name), int(size)) for name, size in self.mesh))

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return make_mesh(self.mesh, devices)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from [(axis name, size)], where one size may be -1 (all remaining devices).

    Axes are `Auto` (GSPMD propagation with `with_sharding_constraint` hints), which is what the
    logical-constraint annotations in the models assume.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise UserError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1:
        raise UserError(f"at most one mesh axis may have size -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise UserError(f"mesh {list(axes)} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
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


def batch_partitions(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """Into how many parts the mesh splits a batch (the product of the mesh axes `act_batch` maps to)."""
    axes = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[axis] for axis in axes)


def global_batch(local_batch: dict, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """This host's batch -> `jax.Array`s of the global batch, split over the mesh's batch axes."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(x)), x),
        local_batch)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
        f" over {np.asarray(mesh.devices).size} {mesh.devices.flat[0].platform} devices"


log = logging.getLogger(__name__)

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None) -> None:
    """Joins the multi-process run this process belongs to, or stays a single process (see the module
    docstring). `local_device_ids` restricts the accelerators this process uses (JAX's meaning)."""
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "jaxseg.parallel.initialize() must be called before any other JAX operation: JAX's "
            "backends are already initialised (by jax.devices(), an array, a jit call, ...), so this "
            "process can no longer join a multi-process run. Call it first thing in main().")
    coordinator_address = (coordinator_address or os.environ.get("JAXSEG_COORDINATOR")
                           or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if num_processes is None:
        num_processes = _env_int("JAXSEG_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXSEG_PROCESS_ID")
    cluster = None if coordinator_address else _detected_cluster()
    if coordinator_address or cluster is not None:
        log.info("joining the run via %s", coordinator_address or cluster.__name__)
        # JAX fills what is still unset from the cluster environment and raises on what it cannot fill.
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    elif num_processes not in (None, 1):
        raise UserError(f"num_processes={num_processes} needs a coordinator address (argument, "
                        "JAXSEG_COORDINATOR or JAX_COORDINATOR_ADDRESS); none is set and no cluster "
                        "environment was detected")
    _initialized = True
    if jax.process_count() > 1:
        log.info("process %d of %d: %d local devices, %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _detected_cluster() -> type | None:
    """The cluster environment `jax.distributed.initialize()` would configure itself from, or None.

    Mirrors JAX's own choice (`ClusterEnv.auto_detect_unset_distributed_params`: the first present
    environment that is not opt-in), which JAX makes only once it is already committed to starting a
    distributed client; asking first is what lets a plain single-process run skip that client."""
    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)
