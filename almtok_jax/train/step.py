"""The training step a run compiles: task, optimizer, shardings and donation for a config on a mesh, from
abstract shapes (``train.py`` runs it; ``--compile-only`` compiles it for a TPU slice)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from almtok_jax.train import sharding as shard_lib
from almtok_jax.train.checkpointer import abstract_with_shardings
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.state import Task, decay_mask, init_train_state, make_optimizer, make_train_step, path_names
from almtok_jax.train.task import build_task


@dataclass(frozen=True)
class TrainStep:
    """The jitted training step of a run and everything it is built from; ``abstract_*`` are
    ``ShapeDtypeStruct`` trees (nothing is allocated), ``*_sh`` their shardings on the mesh."""

    task: Task
    optimizer: optax.GradientTransformation
    init: Callable[[], tuple]  # () -> (state, frozen) at step 0 from the modules' initializers
    batch_shapes: dict[str, jax.ShapeDtypeStruct]
    abstract_state: Any
    abstract_frozen: Any
    state_sh: Any
    frozen_sh: Any
    batch_sh: dict[str, NamedSharding]
    train_step: Callable  # jitted (state, frozen, batch) -> (state, metrics); the state is donated

    def abstract_inputs(self) -> tuple:
        """``(state, frozen, batch)`` as ``ShapeDtypeStruct``s carrying their shardings (for ``.lower``)."""
        return (abstract_with_shardings(self.abstract_state, self.state_sh),
                abstract_with_shardings(self.abstract_frozen, self.frozen_sh),
                abstract_with_shardings(self.batch_shapes, self.batch_sh))


def build_train_step(config: TrainConfig, mesh: Mesh, schedule: Callable[[jax.Array], jax.Array]) -> TrainStep:
    """The step ``train.py`` runs for ``config`` on ``mesh`` (task, optimizer, shardings, donation), with
    ``config.data.global_batch_size`` clips per step; shapes only, no variables are made."""
    task = build_task(config.model, config)
    names = task.param_names or path_names
    optimizer = make_optimizer(config.optimizer, lambda p: decay_mask(names(p), config.optimizer.no_decay))
    rows = config.data.global_batch_size
    batch_shapes = {"wav": jax.ShapeDtypeStruct((rows, config.data.segment_samples), jnp.float32),
                    "length": jax.ShapeDtypeStruct((rows,), jnp.int32)}

    def init() -> tuple:
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_shapes.items()}
        return init_train_state(task, optimizer, config.seed, zeros)

    abstract_state, abstract_frozen = jax.eval_shape(init)
    state_sh = shard_lib.state_shardings(abstract_state, mesh, config.sharding)
    frozen_sh = shard_lib.tree_shardings(abstract_frozen, mesh, config.sharding.frozen,
                                         config.sharding.min_shard_size)
    batch_sh = {k: shard_lib.batch_sharding(mesh) for k in batch_shapes}
    train_step = jax.jit(make_train_step(task, optimizer, schedule, config),
                         in_shardings=(state_sh, frozen_sh, batch_sh),
                         out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    return TrainStep(task, optimizer, init, batch_shapes, abstract_state, abstract_frozen, state_sh, frozen_sh,
                     batch_sh, train_step)
