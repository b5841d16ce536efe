"""Train ALMTokenizer2 (or the toy stand-in task) with sharded, jit-compiled steps.

    python train.py --config configs/train_tiny.yaml --workdir runs/tiny [--steps N] [--resume] \\
        [--multihost] [--export DIR] [key=value ...]

``--steps N``: the number of optimizer steps to reach (a resumed run continues up to N); it does not
change the learning-rate schedule, whose horizon comes from the config (``schedule.total_steps``, else
``steps``, else ``epochs``); past the horizon the learning rate stays at its final value (logged once).
``key=value`` overrides use dotted config keys (``optimizer.learning_rate=3e-4``).
Everything goes under ``--workdir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``sharding.json``,
``checkpoints/``, ``tensorboard/``, ``samples/``. A workdir that holds a run already is refused unless
``--resume`` continues it or ``--overwrite`` deletes it first. A resumed run continues from the newest
checkpoint that reads back and drops the ``metrics.jsonl`` lines after it. ``--workdir``, ``--export``,
``init`` and the data lists may be local paths or URIs (``gs://bucket/run``: ``etils.epath``, as orbax).
Multi-host: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` on each process (see
:mod:`almtok_jax.train.sharding`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
import yaml
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from almtok_jax.config import load_model_config, load_yaml, override, save_yaml, to_dict
from almtok_jax.train import data as data_lib
from almtok_jax.train import integrity
from almtok_jax.train import sharding as shard_lib
from almtok_jax.train.checkpointer import Checkpointer, abstract_with_shardings, export_params
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.interrupt import stop_on_signals
from almtok_jax.train.reporting import TrainLogger, setup_console
from almtok_jax.train.state import (
    Task,
    make_eval_step,
    make_schedule,
    new_train_state,
    past_horizon_note,
)
from almtok_jax.train.step import build_train_step
from almtok_jax.train.task import is_task_reference
from almtok_jax.weights.model_dir import check_replaceable, location

log = logging.getLogger("almtok_jax.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML (configs/train_*.yaml)")
    parser.add_argument("--workdir", help="checkpoints, logs and metrics go here (required unless --compile-only)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps to reach (total)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in --workdir (checkpoints, logs) and start over")
    parser.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize()")
    parser.add_argument("--export", default=None, help="write the trained weights as a model directory")
    parser.add_argument("--force", action="store_true", help="let --export replace an existing model directory")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the step for --topology (or the local devices) and print the per-chip "
                             "report (almtok_jax.train.compile_only); nothing is trained or written")
    parser.add_argument("--topology", default=None,
                        help="with --compile-only: a TPU slice (v5e-256, v4-128, ...; needs the tpu extra)")
    parser.add_argument("--search-batch", type=int, default=0, metavar="N",
                        help="with --compile-only: at most N more compiles to find the largest clips per chip")
    parser.add_argument("--json", default=None, help="with --compile-only: also write the report here")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    if not (args.compile_only or args.workdir):
        parser.error("--workdir is required (unless --compile-only)")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --workdir, --overwrite deletes it: give one of them")
    return args


RUN_OUTPUTS = ("checkpoints", "checkpoints.unreadable", "metrics.jsonl", "sharding.json", "tensorboard", "samples")


@contextlib.contextmanager
def reported_as_user_error() -> Iterator[None]:
    """Errors the user causes (config keys and values, paths, mesh sizes) end the run with their message
    alone: they name the key, value or file, and a traceback would only hide it."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


def checkpoint_steps(workdir: epath.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def prepare_workdir(workdir: epath.Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over in a workdir that holds a run (its checkpoints, its metrics) unless told how:
    ``resume`` continues it, ``overwrite`` deletes its outputs first (process 0; the others wait)."""
    steps = checkpoint_steps(workdir)
    metrics = workdir / "metrics.jsonl"
    has_metrics = metrics.is_file() and metrics.stat().length > 0
    if resume or not (steps or has_metrics):
        return
    if not overwrite:
        held = ", ".join(([f"checkpoints up to step {steps[-1]}"] if steps else []) +
                         (["metrics.jsonl"] if has_metrics else []))
        raise SystemExit(f"error: {workdir} holds a run already ({held}); pass --resume to continue it, or "
                         "--overwrite to delete it and start over (or choose another --workdir)")
    if jax.process_index() == 0:
        log.warning("--overwrite: deleting the run in %s", workdir)
        for name in RUN_OUTPUTS:
            path = workdir / name
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train.py --overwrite")


def put_global(tree: object, shardings: object) -> object:
    """Host NumPy arrays (the same on every host) -> global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings)


def model_config_text(config: TrainConfig) -> str:
    """A model directory's ``config.yaml``: every value of the model (a preset lists only its differences)."""
    if is_task_reference(config.model):
        return yaml.safe_dump({"model": config.model})
    return yaml.safe_dump(to_dict(load_model_config(config.model)), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_console()
    shard_lib.maybe_initialize_distributed(args.multihost)
    with reported_as_user_error():
        config = override(load_yaml(TrainConfig, args.config), args.overrides)
    if args.compile_only:
        from almtok_jax.train.compile_only import report_train  # needs no data, workdir or weights

        with reported_as_user_error():
            report_train(config, args.topology, args.json, args.search_batch)
        return
    workdir = location(args.workdir)
    if args.export:
        with reported_as_user_error():  # before any work, not after the whole run
            check_replaceable(args.export, args.force)
    prepare_workdir(workdir, args.resume, args.overwrite)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, workdir / "config.yaml")
    if config.precision.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.precision.matmul_precision)

    with reported_as_user_error():
        mesh = shard_lib.make_mesh(config.mesh)
        num_clips = data_lib.dataset_size(config.data.train, config.data)
        total_steps = args.steps if args.steps is not None else config.total_steps(num_clips)
        horizon = config.schedule_steps(num_clips)
        schedule = make_schedule(config.schedule, config.optimizer.learning_rate, horizon,
                                 config.warmup_steps(num_clips))
    log.info("mesh %s over %d devices; %d clips; %d steps (schedule horizon %d, warmup %d)",
             dict(mesh.shape), mesh.size, num_clips, total_steps, horizon, config.warmup_steps(num_clips))
    if note := past_horizon_note(total_steps, horizon, schedule):
        log.warning(note)

    setup = build_train_step(config, mesh, schedule)
    task, optimizer, init, abstract_state = setup.task, setup.optimizer, setup.init, setup.abstract_state
    state_sh, frozen_sh, batch_sh = setup.state_sh, setup.frozen_sh, setup.batch_sh

    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint)
    resume = args.resume and checkpointer.latest_step() is not None
    with reported_as_user_error():  # a broken or mismatched model directory
        state, frozen = starting_point(task, config, init, optimizer, state_sh, frozen_sh, with_state=not resume)
    if resume:
        target = abstract_with_shardings(abstract_state, state_sh)
        with reported_as_user_error():  # no checkpoint reads back
            state = checkpointer.restore(target)
        log.info("resumed from step %d", int(state.step))
    start = int(state.step)
    if start >= total_steps:
        log.warning("the target step %d is already reached (the run is at step %d): nothing to train",
                    total_steps, start)
    # The data position is the step (one global batch per update), so any process count resumes any other's.
    rows = shard_lib.process_rows(mesh, config.data.global_batch_size)
    train_iter = iter(data_lib.make_loader(config.data.train, config.data, config.seed, rows=rows, first_batch=start))

    if primary:
        report = {name: shard_lib.describe(tree) for name, tree in
                  (("trainable", state.trainable), ("extra", state.extra), ("frozen", frozen))}
        (workdir / "sharding.json").write_text(json.dumps(report, indent=1))

    train_step = setup.train_step
    seconds_per_step = config.data.global_batch_size * config.data.segment_seconds
    logger = TrainLogger(workdir, config.logging.tensorboard, audio_seconds_per_step=seconds_per_step,
                         resume_step=start if args.resume else None)
    hooks = EvalHooks(config, task, mesh, state_sh, frozen_sh, batch_sh, logger)

    step, skips, saved = start, SkipCounter(config.max_skipped_in_a_row), None
    with stop_on_signals() as stop:
        while step < total_steps and stop.signal is None:
            batch = shard_lib.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, frozen, batch)
            step += 1
            if step % config.logging.every == 0 or step == total_steps:
                logger.log_train(step, jax.device_get(metrics))
            if step == start + 1:
                jax.block_until_ready(metrics)
                logger.start(step)  # throughput figures leave out the first step (compilation)
            skips.add(step, metrics["update_skipped"], saved)  # reads the previous step's flag: no stall
            if step % config.checkpoint.every == 0 or step == total_steps or stop.signal is not None:
                if not int(metrics["update_skipped"]) and checkpointer.save(step, state):
                    saved = step
            hooks(step, state, frozen, batch)
    checkpointer.close()
    if stop.signal is not None:
        logger.close()
        where = f"checkpoint {saved} saved" if saved == step else f"no checkpoint at step {step}"
        log.warning("stopped by %s at step %d (%s); continue with --resume", stop.signal.name, step, where)
        raise SystemExit(128 + stop.signal.value)
    if args.export:
        if not integrity.inspect(state)[1]:
            raise SystemExit(f"error: the trained state holds NaN or infinite values; nothing exported to "
                             f"{args.export}")
        if task.export_fn is not None:
            task.export_fn(args.export, state.trainable, frozen, state.extra, args.force)
        else:
            export_params(args.export, state.trainable, frozen, model_config_text(config), extra=state.extra,
                          force=args.force)
    logger.close()


class SkipCounter:
    """Stops the run once ``limit`` updates in a row were skipped (loss or gradient not finite). Each step's
    flag is read when the next step has been dispatched, so the host never waits for the devices."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.pending = limit, 0, None

    def add(self, step: int, skipped: jax.Array, saved: int | None) -> None:
        if self.pending is not None:
            previous, flag = self.pending
            self.in_a_row = self.in_a_row + 1 if int(flag) else 0
            if self.in_a_row >= self.limit:
                last = f"checkpoint {saved} is the last written" if saved is not None else "no checkpoint written"
                raise SystemExit(
                    f"error: training diverged: the loss or gradient was not finite at steps "
                    f"{previous - self.in_a_row + 1} to {previous} ({self.in_a_row} updates skipped in a row, "
                    f"max_skipped_in_a_row={self.limit}); {last}. Lower optimizer.learning_rate or check the data")
        self.pending = (step, skipped)


def starting_point(task: Task, config: TrainConfig, init: Callable[[], tuple], optimizer: optax.GradientTransformation,
                   state_sh: Any, frozen_sh: Any, with_state: bool) -> tuple:
    """``(state, frozen)`` at step 0, built on the devices: the frozen parts from ``config.frozen_from``, the
    trained parts (and their extra state) from ``config.trainable_init``, ``"random"`` meaning the modules'
    own initializers; trained parts the model directory does not hold start from theirs. ``state`` is None
    (and not built) unless ``with_state`` (a resumed run restores it)."""
    random_frozen, random_trainable = config.frozen_from == "random", config.trainable_init == "random"
    if not (random_frozen and random_trainable) and task.load_fn is None:
        raise SystemExit(f"error: model {config.model!r} cannot start from a model directory "
                         "(frozen_from / trainable_init)")
    if random_frozen and random_trainable and with_state:
        return jax.jit(init, out_shardings=(state_sh, frozen_sh))()
    if random_frozen:
        frozen = jax.jit(lambda: init()[1], out_shardings=frozen_sh)()
    else:
        frozen = put_global(task.load_fn(config.frozen_from, "frozen")[1], frozen_sh)
    if not with_state:
        return None, frozen
    if random_trainable:
        return jax.jit(lambda: init()[0], out_shardings=state_sh)(), frozen
    trainable, _, extra = task.load_fn(config.trainable_init, "trainable")
    fresh = [name for name in state_sh.trainable if name not in trainable]
    if fresh:  # e.g. the GPT-loss predictor: no model directory holds it
        log.info("trainable parts %s start from their initializers (not in %s)", fresh, config.trainable_init)
        new = jax.device_get(jax.jit(lambda: init()[0])())
        trainable = {**trainable, **{k: new.trainable[k] for k in fresh}}
        extra = {**extra, **{k: new.extra[k] for k in fresh if k in new.extra}}
    make = jax.jit(lambda t, e: new_train_state(t, e, optimizer, config.seed), out_shardings=state_sh)
    return make(put_global(trainable, state_sh.trainable), put_global(extra, state_sh.extra)), frozen


class EvalHooks:
    """Validation loss every ``validation.every`` steps; reconstruction samples every ``samples_every``."""

    def __init__(self, config: TrainConfig, task, mesh, state_sh, frozen_sh, batch_sh, logger: TrainLogger):
        self.config, self.task, self.mesh, self.logger = config, task, mesh, logger
        v = config.validation
        rows = shard_lib.process_rows(mesh, config.data.global_batch_size)
        self.loaders = {epath.Path(p).stem: data_lib.make_loader(p, config.data, config.seed, shuffle=False,
                                                                 num_epochs=1, rows=rows)
                        for p in v.lists} if v.every else {}
        replicated = NamedSharding(mesh, PartitionSpec())
        self.eval_step = jax.jit(make_eval_step(task), out_shardings=replicated,
                                 in_shardings=(state_sh, frozen_sh, batch_sh, replicated))
        self.reconstruct = None
        if v.samples_every and task.reconstruct_fn is not None:
            self.reconstruct = jax.jit(task.reconstruct_fn)
        self.rng = jax.random.key(config.seed + 1)

    def __call__(self, step: int, state, frozen, batch) -> None:
        v = self.config.validation
        if v.every and step % v.every == 0:
            for name, loader in self.loaders.items():
                totals, count = {}, 0
                for local in loader:
                    val_batch = shard_lib.global_batch(local, self.mesh)
                    metrics = jax.device_get(self.eval_step(state, frozen, val_batch, self.rng))
                    totals = {k: totals.get(k, 0.0) + float(m) for k, m in metrics.items()}
                    count += 1
                    if count == v.batches:
                        break
                if count:
                    self.logger.log_eval(step, name, {k: t / count for k, t in totals.items()})
                else:
                    log.warning("validation list %s yields no full batch", name)
        if self.reconstruct is not None and step % v.samples_every == 0:
            wav = batch["wav"]
            rec = self.reconstruct(state.trainable, frozen, state.extra, wav, self.rng)
            rec, ref = (multihost_utils.process_allgather(x, tiled=True)[: v.num_samples] for x in (rec, wav))
            self.logger.write_samples(step, rec, ref, self.config.data.sample_rate)


if __name__ == "__main__":
    main()

