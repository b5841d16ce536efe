"""Train state, optimizer, learning-rate schedule and the jitted training step, generic over a task.

A :class:`Task` is the model side of training: ``init_fn`` makes the three variable trees, ``loss_fn``
computes the loss. Only the ``trainable`` tree is differentiated and has optimizer state; ``frozen``
(experts, SQ codec) is an input of the step; ``extra`` (e.g. the RVQ codebook EMA state) is replaced by
the loss function's output, never by the optimizer (spec ``02-quantizer.md`` §8, ``04`` B.7-B.9).

:func:`almtok_jax.train.task.build_task` selects the task from ``TrainConfig.model``. The step logs whatever
metrics the task's loss returns, plus ``loss``, ``grad_norm``, ``lr`` and the skip counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from almtok_jax.train.config import OptimizerConfig, ScheduleConfig, TrainConfig

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (trainable, frozen, extra, batch, rng) -> (loss, (metrics, new_extra))
LossFn = Callable[[Params, Params, Params, Batch, jax.Array], tuple[jax.Array, tuple[Metrics, Params]]]


@dataclass(frozen=True)
class Task:
    """The model side of training.

    ``init_fn(rng, batch) -> (trainable, frozen, extra)``; ``loss_fn`` as :data:`LossFn` (``batch`` is the
    data pipeline's dict: ``wav`` (B, S) float32 at 24 kHz, ``length`` (B,) int32 valid samples);
    ``reconstruct_fn(trainable, frozen, extra, wav, rng) -> wav`` (optional, for audio samples);
    ``param_names(trainable) -> tree of str`` (optional): the reference (PyTorch) name of every trainable
    leaf, used by the weight-decay rule; default: the Flax path joined with ``"."``;
    ``load_fn(model_dir, part) -> (trainable, frozen, extra)`` as host arrays (optional), ``part`` being
    ``"frozen"`` or ``"trainable"``: the frozen parts (``frozen_from: DIR``) or the trained parts
    (``trainable_init: DIR``) of a model directory instead of ``init_fn``'s random values; trained parts it
    does not return keep ``init_fn``'s; ``export_fn(directory, trainable, frozen, extra, force)`` (optional) writes
    the model directory of ``train.py --export`` (default: the trees as they are, with the preset's config).
    """

    init_fn: Callable[[jax.Array, Batch], tuple[Params, Params, Params]]
    loss_fn: LossFn
    reconstruct_fn: Callable[..., jax.Array] | None = None
    param_names: Callable[[Params], Any] | None = None
    load_fn: Callable[[str, str], tuple[Params, Params, Params]] | None = None
    export_fn: Callable[[str, Params, Params, Params, bool], Any] | None = None


@struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed together)."""

    step: jax.Array  # int32 scalar: updates done, skipped ones included (drives the schedule and the RNG)
    trainable: Params
    opt_state: optax.OptState
    extra: Params
    rng: jax.Array  # uint32 raw key data of the base key
    skipped: jax.Array  # int32 scalar: updates skipped for non-finite gradients


def path_names(tree: Params) -> Any:
    """Tree of ``"a.b.c"`` names from the Flax paths."""
    def name(path: tuple, _: Any) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return jax.tree_util.tree_map_with_path(name, tree)


def decay_mask(names: Any, no_decay: tuple[str, ...]) -> Any:
    """True where weight decay applies: the name contains none of the ``no_decay`` substrings."""
    return jax.tree.map(lambda n: not any(s in n for s in no_decay), names)


def make_optimizer(config: OptimizerConfig, mask: Any) -> optax.GradientTransformation:
    """AdamW without the learning rate (applied in the step so the schedule can run on its own counter)."""
    return optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=mask),
    )


def make_schedule(config: ScheduleConfig, peak_lr: float, total_steps: int,
                  warmup_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Reference ``get_cosine_scheduler``: ``c/W`` for ``c < W``, then a half cosine to ``end`` at ``S``,
    and ``end`` after ``S`` (the reference's ``max(0, cos)`` form would climb back up past the horizon).

    ``c`` = updates done before this one, so the first update uses lr 0 (B.8).
    """
    end = config.end_lr_fraction

    def schedule(count: jax.Array) -> jax.Array:
        c = jnp.asarray(count, jnp.float32)
        warm = c / max(1, warmup_steps)
        if config.kind == "constant":
            after = jnp.ones_like(c)
        else:
            progress = jnp.minimum(c - warmup_steps, total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
            after = end + (1.0 - end) * jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return peak_lr * jnp.where(c < warmup_steps, warm, after)

    return schedule


def past_horizon_note(run_steps: int, horizon: int, schedule: Callable[[jax.Array], jax.Array]) -> str | None:
    """The log line for a run that goes past the schedule horizon, else ``None``."""
    if run_steps <= horizon:
        return None
    return (f"the run goes to step {run_steps}, past the schedule horizon of {horizon} steps: from update "
            f"{horizon + 1} on the learning rate stays at its final value {float(schedule(horizon)):.3g}")


def _cast_floats(tree: Params, dtype: jnp.dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _loss_and_grads(task: Task, compute_dtype: jnp.dtype) -> Callable:
    def loss(trainable: Params, frozen: Params, extra: Params, batch: Batch, rng: jax.Array):
        loss, (metrics, new_extra) = task.loss_fn(
            _cast_floats(trainable, compute_dtype), _cast_floats(frozen, compute_dtype), extra, batch, rng)
        return loss.astype(jnp.float32), (metrics, new_extra)

    return jax.value_and_grad(loss, has_aux=True)


def _float_metrics(loss: jax.Array, metrics: Metrics) -> Metrics:
    return {**{k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, "loss": loss}


def make_train_step(task: Task, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], config: TrainConfig) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)`` (to be wrapped in ``jax.jit``).

    ``grad_accum`` micro-batches are scanned and their gradients (and metrics) averaged, which equals one
    full-batch step when the loss is a mean of per-row terms; a loss normalised over the whole batch, or
    extra state updated per micro-batch (EMA codebooks), makes it an average of micro-batch steps instead
    (``tests/test_train_infra.py``). The update is skipped (state
    kept, ``skipped`` counted, step still advanced like the reference's scheduler) when the loss or the
    pre-clip gradient norm is not finite.
    """
    accum = config.optimizer.grad_accum
    clip = config.optimizer.clip_norm
    grad_fn = _loss_and_grads(task, jnp.dtype(config.precision.compute_dtype))

    def micro_batches(batch: Batch) -> Batch:
        # Micro-batch i takes rows i, i + accum, ...: each device keeps its own rows in every micro-batch.
        def split(x: jax.Array) -> jax.Array:
            if x.shape[0] % accum:
                raise ValueError(f"batch of {x.shape[0]} not divisible by grad_accum={accum}")
            return jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)
        return jax.tree.map(split, batch)

    def step(state: TrainState, frozen: Params, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro_step(extra: Params, micro: Batch, i: jax.Array) -> tuple[Params, Params, Metrics]:
            key = rng if accum == 1 else jax.random.fold_in(rng, i)
            (loss, (metrics, extra)), grads = grad_fn(state.trainable, frozen, extra, micro, key)
            return grads, extra, _float_metrics(loss, metrics)

        if accum == 1:
            grads, extra, metrics = micro_step(state.extra, batch, 0)
        else:
            micro = micro_batches(batch)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731

            def body(carry, xs):
                grads_sum, extra, metrics_sum = carry
                grads, extra, metrics = micro_step(extra, *xs)
                return (add(grads_sum, grads), extra, add(metrics_sum, metrics)), None

            first = micro_step(state.extra, jax.tree.map(lambda x: x[0], micro), 0)
            rest = (jax.tree.map(lambda x: x[1:], micro), jnp.arange(1, accum))
            (grads, extra, metrics), _ = jax.lax.scan(body, first, rest)
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        if clip > 0:
            grads = jax.tree.map(lambda g: g * (clip / jnp.maximum(grad_norm, clip)), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        lr = schedule(state.step)
        trainable = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.trainable, updates)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, trainable=keep(trainable, state.trainable),
                                  opt_state=keep(opt_state, state.opt_state),
                                  extra=keep(extra, state.extra), skipped=skipped)
        metrics = {**metrics, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                   "update_skipped": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return step


def make_eval_step(task: Task) -> Callable:
    """``eval_step(state, frozen, batch, rng) -> metrics`` (the extra state is not updated)."""
    def eval_step(state: TrainState, frozen: Params, batch: Batch, rng: jax.Array) -> Metrics:
        loss, (metrics, _) = task.loss_fn(state.trainable, frozen, state.extra, batch, rng)
        return _float_metrics(loss.astype(jnp.float32), metrics)
    return eval_step


def new_train_state(trainable: Params, extra: Params, optimizer: optax.GradientTransformation,
                    seed: int) -> TrainState:
    """The step-0 state around given variables (fresh optimizer state; jit it with shardings)."""
    base = jax.random.key(seed)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                      extra=extra, rng=jax.random.key_data(jax.random.fold_in(base, 1)),
                      skipped=jnp.zeros((), jnp.int32))


def init_train_state(task: Task, optimizer: optax.GradientTransformation, seed: int,
                     batch: Batch) -> tuple[TrainState, Params]:
    """Fresh ``(state, frozen)`` from ``task.init_fn`` (pure function of ``seed`` and the batch shapes; jit
    it with shardings)."""
    trainable, frozen, extra = task.init_fn(jax.random.fold_in(jax.random.key(seed), 0), batch)
    return new_train_state(trainable, extra, optimizer, seed), frozen
