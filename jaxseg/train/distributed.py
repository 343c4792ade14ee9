"""Joining a multi-process (multi-host) run: the one place that calls `jax.distributed.initialize`.

Call `initialize()` first thing in a program, before any other JAX operation. Where the coordinator
comes from, first match wins:

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

import logging
import os
from typing import Sequence

import jax
from jax._src import clusters, xla_bridge

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
            "jaxseg.train.distributed.initialize() must be called before any other JAX operation: JAX's "
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
        raise ValueError(f"num_processes={num_processes} needs a coordinator address (argument, "
                         "JAXSEG_COORDINATOR or JAX_COORDINATOR_ADDRESS); none is set and no cluster "
                         "environment was detected")
    _initialized = True
    log.info("process %d of %d: %d local devices, %d global devices (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _detected_cluster() -> type | None:
    """The cluster environment `jax.distributed.initialize()` would configure itself from, or None.

    Mirrors JAX's own choice (`ClusterEnv.auto_detect_unset_distributed_params`: the first present
    environment that is not opt-in), which JAX makes only once it is already committed to starting a
    distributed client; asking first is what lets a plain single-process run skip that client."""
    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)
