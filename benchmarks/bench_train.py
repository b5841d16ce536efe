"""Training-step throughput: steps/s and audio-hours/s of the jitted, sharded step on synthetic batches.

    python benchmarks/bench_train.py --config configs/train_toy.yaml [--steps 20] [key=value ...]

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_train.py \
        --config configs/train_tiny.yaml mesh.data=8                      # the real task on 8 CPU devices

Uses the task named by the config's ``model`` (``tests.toy_task:toy_task`` or a model preset: the real ALMTokenizer2
loss of :mod:`almtok_jax.train.task`) and leaves the input pipeline out (random waveforms), so it measures the
device step only. Prints one JSON line: compile seconds, mean step seconds, steps/s, audio seconds and
hours per second, peak memory (per device from the allocator where it reports it, else the host process's
peak RSS), devices, mesh.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.config import load_yaml, override
from almtok_jax.train import sharding as shard_lib
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.state import (
    decay_mask,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    path_names,
)
from almtok_jax.train.task import build_task


def peak_memory_gib() -> dict[str, float]:
    """Peak bytes in use on the busiest local device (GPU/TPU allocators) and the host's peak RSS, GiB."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    device = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"device_peak_gib": round(device / 2**30, 3), "host_peak_rss_gib": round(host / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = override(load_yaml(TrainConfig, args.config), args.overrides)
    mesh = shard_lib.make_mesh(config.mesh)
    task = build_task(config.model, config)
    names = task.param_names or path_names
    optimizer = make_optimizer(config.optimizer, lambda p: decay_mask(names(p), config.optimizer.no_decay))
    schedule = make_schedule(config.schedule, config.optimizer.learning_rate, 10_000, 0)
    rows, samples = config.data.global_batch_size, config.data.segment_samples
    local = {"wav": (0.1 * np.random.default_rng(0).standard_normal((rows, samples))).astype(np.float32),
             "length": np.full((rows,), samples, np.int32)}
    batch = shard_lib.global_batch(local, mesh)

    def init():
        zeros = {k: jnp.zeros_like(v) for k, v in batch.items()}
        return init_train_state(task, optimizer, config.seed, zeros)

    abstract_state, abstract_frozen = jax.eval_shape(init)
    state_sh = shard_lib.state_shardings(abstract_state, mesh, config.sharding)
    frozen_sh = shard_lib.tree_shardings(abstract_frozen, mesh, config.sharding.frozen,
                                         config.sharding.min_shard_size)
    state, frozen = jax.jit(init, out_shardings=(state_sh, frozen_sh))()
    step = jax.jit(make_train_step(task, optimizer, schedule, config), donate_argnums=(0,),
                   in_shardings=(state_sh, frozen_sh, {k: shard_lib.batch_sharding(mesh) for k in batch}),
                   out_shardings=(state_sh, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / args.steps
    audio_s = rows * config.data.segment_seconds / step_s
    print(json.dumps({
        "model": config.model, "devices": mesh.size, "mesh": dict(mesh.shape), "global_batch": rows,
        "segment_seconds": config.data.segment_seconds, "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5), "steps_per_s": round(1 / step_s, 3),
        "audio_seconds_per_s": round(audio_s, 3), "audio_hours_per_s": round(audio_s / 3600, 5),
        "loss": round(float(metrics["loss"]), 5), **peak_memory_gib(), "backend": jax.default_backend(),
    }))


if __name__ == "__main__":
    main()
