"""Device mesh and shardings: data parallelism on a ``data`` axis, parameters sharded on an ``fsdp`` axis.

The batch is split over both axes (FSDP is data parallel too: every device sees its own examples), while
every parameter-shaped array (parameters, EMA, optimizer moments) is split along its largest dimension that
the ``fsdp`` axis size divides, and replicated over ``data``. With ``fsdp = 1`` this is plain data
parallelism. ``jax.jit`` with these ``NamedSharding``s lets XLA insert the all-gathers and reduce-scatters
(Xu et al. 2021, "GSPMD"; the ZeRO-3 / FSDP layout of Rajbhandari et al. 2020).

Multi-host runs call ``initialize_distributed`` first; each process then feeds only its own slice of the
global batch, assembled into one global array by ``global_batch``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, heartbeat_timeout_seconds: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` when several processes are configured (arguments or the usual
    environment of a TPU pod / SLURM / the ``JAX_COORDINATOR_ADDRESS`` variables); a no-op for one process.

    When a process dies, the others stop (JAX's coordination service aborts them, naming the dead task) once
    it has missed heartbeats for ``heartbeat_timeout_seconds`` (default ``DIFFJAX_HEARTBEAT_TIMEOUT_SECONDS``
    or JAX's 100), instead of waiting in a collective forever; the pair then resumes from the last complete
    checkpoint. With several processes SIGTERM goes through JAX's preemption sync, so that all of them
    checkpoint at the same step."""
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address is None and (num_processes or 1) <= 1:
        return
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = int(os.environ.get("DIFFJAX_HEARTBEAT_TIMEOUT_SECONDS", 100))
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def create_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A 2-D mesh (data, fsdp) over all devices; ``fsdp`` must divide the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"sharding.fsdp={fsdp} must be a positive divisor of the device count {n}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((n // fsdp, fsdp), devices=devices)
    except Exception:  # irregular device sets (e.g. simulated CPU devices across processes)
        grid = np.asarray(devices).reshape(n // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data × fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2**10) -> P:
    """Shard the largest dimension that ``fsdp_size`` divides (arrays smaller than ``min_size`` elements, and
    scalars, stay replicated: splitting them costs more in communication than it saves in memory)."""
    if fsdp_size <= 1 or len(shape) == 0 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for every array leaf of a (possibly abstract) pytree by the FSDP rule; the same rule
    gives parameters, EMA parameters and Adam moments of one shape the same layout."""
    fsdp_size = mesh.shape[FSDP]

    def rule(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size))

    return jax.tree_util.tree_map(rule, abstract_tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "training.batch_size") -> None:
    """One line when the global batch does not split evenly over devices and processes."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"{what}={global_batch_size} is not divisible by the number of devices ({n})")
    if global_batch_size % jax.process_count():
        raise ValueError(f"{what}={global_batch_size} is not divisible by the number of processes "
                         f"({jax.process_count()})")


def global_batch(mesh: Mesh, local_batch: Any) -> Any:
    """Assemble each process's slice of the batch (numpy, leading axis = local batch) into global arrays
    sharded over data × fsdp."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  local_batch)
