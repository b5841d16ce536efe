"""Memory and FLOPs of the full-size training step, from the compiled program only (nothing is run).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/bench_train_memory.py --config configs/train_almtokenizer2.yaml \\
        --clips-per-device 1 2 mesh.data=1 mesh.fsdp=8 [key=value ...]

The train step of ``train.py`` (same task, optimizer, shardings) is lowered with abstract inputs
(``ShapeDtypeStruct`` with shardings: no weights are made) and compiled for each per-device batch size
given. Per device it reports:

* the bytes of the state by part (trainable parameters, optimizer state, codebook/extra state, frozen
  experts + SQ codec) as placed by the shardings, against the unsharded totals;
* the compiled program's ``memory_analysis()`` (arguments, outputs, temporaries, aliased donations) and
  ``cost_analysis()`` FLOPs per step (per device: the program is SPMD);
* activation bytes per clip = the slope of the temporaries between two batch sizes, and from it how many
  12 s clips per device fit in 16 GB (TPU v5e) and 80 GB (H100) next to the state.

The buffer assignment is the CPU backend's: a TPU/GPU compile fuses differently, so read the clip counts as
an estimate of the order of magnitude. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from almtok_jax.config import load_yaml, override
from almtok_jax.train import sharding as shard_lib
from almtok_jax.train.compile_only import tree_bytes
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.state import make_schedule
from almtok_jax.train.step import build_train_step

ACCELERATORS = {"tpu_v5e_16GB": 16e9, "h100_80GB": 80e9}
GIB = 2**30


def compile_step(config: TrainConfig, clips_per_device: int) -> dict:
    mesh = shard_lib.make_mesh(config.mesh)
    rows = clips_per_device * mesh.size
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, global_batch_size=rows))
    setup = build_train_step(config, mesh, make_schedule(config.schedule, config.optimizer.learning_rate, 10_000, 100))
    state, frozen, batch = setup.abstract_inputs()
    state_sh = setup.state_sh
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    parts = {"params": (state.trainable, state_sh.trainable), "optimizer": (state.opt_state, state_sh.opt_state),
             "extra": (state.extra, state_sh.extra), "frozen": (frozen, setup.frozen_sh)}
    state_report = {name: {"total_bytes": tree_bytes(t), "per_device_bytes": tree_bytes(t, s)}
                    for name, (t, s) in parts.items()}
    return {
        "clips_per_device": clips_per_device, "global_batch": rows, "mesh": dict(mesh.shape),
        "compile_s": round(compile_s, 1), "state": state_report,
        "memory_analysis": {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")},
        "flops_per_step_per_device": float(cost.get("flops", float("nan"))),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
    }


def fit(runs: list[dict], segment_seconds: float) -> dict:
    """Clips per device that fit each accelerator: (capacity - state - fixed temporaries) / bytes per clip."""
    small, large = runs[0], runs[-1]
    state = sum(p["per_device_bytes"] for p in small["state"].values())
    temp = [r["memory_analysis"]["temp_size_in_bytes"] for r in (small, large)]
    per_clip = (temp[1] - temp[0]) / max(1, large["clips_per_device"] - small["clips_per_device"])
    fixed = temp[0] - per_clip * small["clips_per_device"]
    out = {"state_per_device_gib": state / GIB, "activation_bytes_per_clip_gib": per_clip / GIB,
           "fixed_temp_gib": fixed / GIB, "segment_seconds": segment_seconds}
    for name, capacity in ACCELERATORS.items():
        out[f"clips_per_device_{name}"] = int((capacity - state - fixed) // per_clip) if per_clip > 0 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--clips-per-device", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = override(load_yaml(TrainConfig, args.config), args.overrides)
    runs = [compile_step(config, n) for n in sorted(args.clips_per_device)]
    report = {"model": config.model, "devices": jax.device_count(), "backend": jax.default_backend(),
              "sharding": {"mode": config.sharding.mode, "frozen": config.sharding.frozen,
                           "extra": config.sharding.extra}, "runs": runs}
    for part in runs[0]["state"].values():
        part["ratio_total_per_device"] = round(part["total_bytes"] / max(1, part["per_device_bytes"]), 2)
    if len(runs) > 1:
        report["fit"] = fit(runs, config.data.segment_seconds)
    print(json.dumps(report, indent=1, default=lambda x: round(x, 3) if isinstance(x, float) else x))


if __name__ == "__main__":
    main()
