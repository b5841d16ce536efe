"""Device mesh and per-leaf partition specs for training.

The mesh has three axes ``("data", "fsdp", "tensor")``. Batches are split over ``("data", "fsdp")``;
parameters and optimizer state are split over ``fsdp`` (ZeRO-3 style, the JAX counterpart of the
reference's FULL_SHARD FSDP, spec ``04-sqcodec-training.md`` B.12); ``tensor`` is reserved for tensor
parallelism: today no leaf and no batch dimension is split over it, so devices along ``tensor`` hold and
compute the same thing (keep ``mesh.tensor=1``).

The model modules carry no ``nn.with_logical_partitioning`` annotations, so :func:`leaf_spec` derives a
spec from each leaf's shape: the largest dimension divisible by the ``fsdp`` size is split over ``fsdp``;
leaves smaller than ``min_shard_size`` elements, or with no divisible dimension, are replicated. The rule
depends on the shape only, so Adam's ``mu`` / ``nu`` get the spec of their parameter.

Multi-host (TPU pod slice, several GPU hosts, or several CPU processes): every process runs the same
command; :func:`maybe_initialize_distributed` joins them when ``JAX_COORDINATOR_ADDRESS`` is set (with
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or detected by jax; ``--multihost`` forces it where the
environment names no coordinator, e.g. a TPU pod), each process reads its own shard of the data, and the
global batch is assembled with ``jax.make_array_from_process_local_data``. On a TPU pod::

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command \\
      "cd almtok-jax && python train.py --config configs/train_almtokenizer2.yaml \\
       --workdir gs://BUCKET/runs/alm_v1 --multihost mesh.data=-1 mesh.fsdp=8"

(``--workdir`` must be a location every host sees: a GCS bucket or a shared file system.) On GPU
clusters set ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` on each host
(``tests/test_multihost.py`` launches 2 CPU processes this way). A checkpoint written by N processes
restores in a run of M processes (orbax restores onto the target shardings).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from almtok_jax.train.config import MeshConfig, ShardingConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")



def maybe_initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize()`` when asked or when ``JAX_COORDINATOR_ADDRESS`` is set.

    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here: jax itself does not) give the process count
    and this process's index; where they are unset, jax detects them (TPU pods, SLURM, Open MPI). CPU
    processes exchange collectives over gloo (jax's default). Must run before anything touches the devices.
    """
    if not (force or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    given = {"num_processes": os.environ.get("JAX_NUM_PROCESSES"), "process_id": os.environ.get("JAX_PROCESS_ID")}
    jax.distributed.initialize(**{k: int(v) for k, v in given.items() if v is not None})
    log.info("distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the ``-1`` entry and check that the sizes multiply to ``num_devices``."""
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                         f"{math.prod(sizes)} devices, {num_devices} available")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh ``("data", "fsdp", "tensor")`` over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def leaf_spec(shape: Sequence[int], fsdp_size: int, min_shard_size: int) -> PartitionSpec:
    """FSDP rule: split the largest dimension divisible by ``fsdp_size``; small leaves stay replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_shard_size:
        return PartitionSpec()
    candidates = [(dim, -i) for i, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, neg_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_axis] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, mode: str, min_shard_size: int) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
    fsdp_size = mesh.shape["fsdp"] if mode == "fsdp" else 1

    def one(leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, leaf_spec(np.shape(leaf), fsdp_size, min_shard_size))

    return jax.tree.map(one, tree)


def state_shardings(abstract_state: Any, mesh: Mesh, config: ShardingConfig) -> Any:
    """Shardings of a :class:`~almtok_jax.train.state.TrainState`: trainable params and optimizer state by
    ``config.mode``, the extra collection by ``config.extra``, scalars and keys replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = tree_shardings(abstract_state.trainable, mesh, config.mode, config.min_shard_size)
    opt = tree_shardings(abstract_state.opt_state, mesh, config.mode, config.min_shard_size)
    extra = tree_shardings(abstract_state.extra, mesh, config.extra, config.min_shard_size)
    return abstract_state.replace(step=replicated, trainable=params, opt_state=opt, extra=extra,
                                  rng=replicated, skipped=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a ``(global_rows, ...)`` batch that this process's devices hold."""
    slices = [idx[0] for idx in batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()]
    start, stop = min(s.start or 0 for s in slices), max(global_rows if s.stop is None else s.stop for s in slices)
    if (stop - start) * jax.process_count() != global_rows:
        raise ValueError(f"this process's devices hold rows {start}..{stop} of {global_rows}: not a contiguous "
                         f"1/{jax.process_count()} block (check the mesh)")
    return start, stop


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this host's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def describe(tree: Any) -> list[dict[str, Any]]:
    """Per leaf: path, global shape, partition spec, and the shape of one addressable shard (as placed)."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        rows.append({
            "path": jax.tree_util.keystr(path),
            "shape": list(leaf.shape),
            "spec": [None if a is None else a if isinstance(a, str) else list(a) for a in leaf.sharding.spec],
            "shard_shape": list(leaf.addressable_shards[0].data.shape),
        })
    return rows
