"""Compile-only runs of the real train and inference steps for real TPU slices, on a machine without a TPU.

    python train.py --config configs/train_almtokenizer2.yaml --compile-only --topology v5e-256 \\
        [--search-batch N] [--json report.json] mesh.fsdp=16 precision.compute_dtype=bfloat16
    python -m almtok_jax.train.compile_only inference --model almtokenizer2 --topology v5e-1 \\
        [--dtype float32 bfloat16] [--batch 1] [--search-batch N] [--json report.json]

With ``libtpu`` installed (``pip install -e ".[tpu]"``), ``jax.experimental.topologies`` describes the
devices of a TPU slice (multi-host ones included) and ``jax.jit(...).lower(abstract inputs).compile()``
runs the TPU compiler ahead of time on the CPU host. The step compiled is the one ``train.py`` runs
(:func:`almtok_jax.train.run.build_train_step`: task, optimizer, shardings, donation, remat, precision) or
the one the tokenizer runs (:func:`almtok_jax.tokenize.sharded_encode_codes`, :func:`almtok_jax.model.
generate_latents` with the model's sampler); inputs are ``ShapeDtypeStruct``s, no weights are made.
Without ``--topology`` the local devices are used (the CPU fallback: ``XLA_FLAGS=--xla_force_host_platform_
device_count=N JAX_PLATFORMS=cpu``), whose buffer assignment differs from a TPU's.

Per chip the report gives the compiler's ``memory_analysis`` (arguments, outputs, temporaries, aliased
donations; peak = arguments + outputs - aliased + temporaries) against the chip's HBM; FLOPs counted on the
traced program (:mod:`almtok_jax.flops`: XLA counts a ``while`` body once, so its own ``flops`` and the
cost model's ``optimal_seconds`` are reported as they are and scaled by counted / XLA FLOPs); the step time
at the chip's peak bf16 rate (MFU 1) and the cost model's; and for training the time to train the reference
recipe (10k hours of 12 s clips, 5 epochs) at a given MFU. ``--search-batch N`` spends at most N more
compiles finding the largest batch per chip that fits (doubling, then bisection guided by the linear
growth of the peak with the batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

GIB = 2**30
RECIPE_HOURS, RECIPE_EPOCHS = 10_000, 5  # the reference recipe's corpus and epochs (spec 04 PART B)
MFU_RANGE = (0.25, 0.5)  # assumed model-FLOP utilisation for the time-to-train range


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float  # dense matmul FLOP/s per chip; fp32 matmuls at default precision run as bf16 passes


# Per chip, from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e): HBM capacity and peak bf16 compute.
CHIPS = {
    "v4": Chip(32 * GIB, 275e12),
    "v5e": Chip(16 * GIB, 197e12),
    "v5p": Chip(95 * GIB, 459e12),
    "v6e": Chip(32 * GIB, 918e12),
}


@dataclass(frozen=True)
class Slice:
    """A TPU slice as users name it (``v5e-256``) -> what ``get_topology_desc`` needs. v4 and v5p names count
    TensorCores (2 per chip, one megacore device per chip), v5e and v6e names count chips."""

    chip: str
    topology: str  # the compiler's name, e.g. "v5e:16x16"
    chips_per_host: tuple[int, int, int] = (2, 2, 1)
    chip_config: str = "default"


SLICES = {
    "v5e-1": Slice("v5e", "v5e:1x1", (1, 1, 1)),
    "v5e-4": Slice("v5e", "v5e:2x2"),
    "v5e-16": Slice("v5e", "v5e:4x4"),
    "v5e-256": Slice("v5e", "v5e:16x16"),
    "v6e-1": Slice("v6e", "v6e:1x1", (1, 1, 1)),
    "v6e-4": Slice("v6e", "v6e:2x2"),
    "v6e-64": Slice("v6e", "v6e:8x8"),
    "v6e-256": Slice("v6e", "v6e:16x16"),
    "v4-8": Slice("v4", "v4:2x2x1", chip_config="megacore"),
    "v4-128": Slice("v4", "v4:4x4x4", chip_config="megacore"),
    "v5p-8": Slice("v5p", "v5p:2x2x1"),
    "v5p-128": Slice("v5p", "v5p:4x4x4"),
}


def slice_devices(name: str) -> tuple[list[jax.Device], Chip]:
    """The devices of the TPU slice ``name`` (a key of :data:`SLICES`) from the TPU compiler, and its chip."""
    if name not in SLICES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(SLICES)}")
    s = SLICES[name]
    # No chip is opened: let several compile-only processes (tests, reports) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, chip_config_name=s.chip_config,
                                            chips_per_host_bounds=s.chips_per_host, num_slices=1)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--topology {name} needs libtpu (pip install -e \".[tpu]\"): {e}") from None
    return list(desc.devices), CHIPS[s.chip]


def local_devices() -> tuple[list[jax.Device], Chip | None]:
    """The CPU fallback: this process's devices (no chip capacity is known)."""
    return jax.devices(), None


def tree_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of ``tree`` (array or ``ShapeDtypeStruct`` leaves): global, or one device's shard under ``shardings``."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True))


def part_bytes(tree: Any, shardings: Any) -> dict:
    """Bytes of a state part: ``total`` (unsharded), ``per_chip`` as placed, ``split``: the total of the leaves
    the shardings split (the rest is replicated)."""
    split = [x for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
             if s.shard_shape(x.shape) != x.shape]
    return {"total": tree_bytes(tree), "per_chip": tree_bytes(tree, shardings), "split": tree_bytes(split)}


def tiled_bytes(shape: Sequence[int], dtype: Any, layout: Any) -> int:
    """Bytes of one array in a TPU layout: dimensions in ``major_to_minor`` order, the minor ones padded to
    the first tile (``(8, 128)`` for float32 matrices, ``(1024,)`` for long vectors, ...)."""
    dims = [shape[d] for d in layout.major_to_minor] or [1]
    tile = layout.tiling[0] if layout.tiling else ()
    padded = dims[: len(dims) - len(tile)] + [-(-d // t) * t for d, t in zip(dims[len(dims) - len(tile):], tile,
                                                                           strict=True)]
    return math.prod(padded) * jnp.dtype(dtype).itemsize


def compiled_inputs(compiled: Any, args: Sequence[Any]) -> dict:
    """Per chip: the bytes of the arguments in the layouts the compiler chose (``compiled.input_formats``),
    the bytes of those it dropped as unused (jit prunes them: no layout, no buffer), and whether it kept the
    shardings asked for."""
    leaves = jax.tree.leaves(args)
    formats = jax.tree.leaves(compiled.input_formats[0], is_leaf=lambda f: hasattr(f, "layout"))
    used = [(x, f) for x, f in zip(leaves, formats, strict=True) if f.layout is not None]
    return {"tiled_input_bytes_per_chip": sum(tiled_bytes(x.sharding.shard_shape(x.shape), x.dtype, f.layout)
                                              for x, f in used),
            "unused_input_bytes_per_chip": tree_bytes([x for x, f in zip(leaves, formats, strict=True)
                                                       if f.layout is None]),
            "input_shardings_kept": all(f.sharding.is_equivalent_to(x.sharding, len(x.shape)) for x, f in used)}


def memory_report(compiled: Any, chip: Chip | None) -> dict:
    """Per-chip bytes from the compiler's buffer assignment, and whether the peak fits the chip's HBM."""
    mem = compiled.memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                 "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    if chip is not None:
        out["capacity"] = chip.hbm_bytes
        out["fits"] = out["peak"] <= chip.hbm_bytes
    return out


def hlo_findings(compiled: Any) -> dict:
    """What a TPU engineer looks for in the compiled program: collectives by kind (count, largest result in
    bytes), matmuls by operand type, host callbacks."""
    text = compiled.as_text()
    found: dict[str, Any] = {}
    for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"):
        sizes = [_shape_bytes(m.group(1)) for m in re.finditer(rf"= (\S+?\[[^\]]*\][^ ]*) {op}(?:-start)?\(", text)]
        if sizes:
            found[op] = {"count": len(sizes), "largest_bytes": max(sizes), "total_bytes": sum(sizes)}
    dots: dict[str, int] = {}
    for m in re.finditer(r"= (\w+)\[[^\]]*\][^ ]* (?:dot|convolution)\(", text):
        dots[m.group(1)] = dots.get(m.group(1), 0) + 1
    found["matmul_result_types"] = dots
    found["host_callbacks"] = text.count("custom_call_target=\"xla_python")
    return found


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def _shape_bytes(shape: str) -> int:
    m = re.match(r"\(?(\w+)\[([^\]]*)\]", shape)
    if not m:
        return 0
    dims = [int(d) for d in m.group(2).split(",") if d.strip().isdigit()]
    return _DTYPE_BYTES.get(m.group(1), 4) * math.prod(dims)


def compile_report(jitted: Callable, args: Sequence[Any], chip: Chip | None, num_chips: int) -> dict:
    """Lower + compile ``jitted`` on abstract ``args``; memory, FLOPs and step-time estimates per chip."""
    from almtok_jax.flops import program_flops

    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    counted = program_flops(traced.jaxpr) / num_chips
    xla_flops = float(cost.get("flops", 0.0))
    out = {"compile_s": round(compile_s, 1), "memory": memory_report(compiled, chip),
           "flops_per_chip": counted, "xla_flops_per_chip": xla_flops,
           "bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),
           "input_bytes_per_chip": tree_bytes(args, jax.tree.map(lambda x: x.sharding, args)),
           **compiled_inputs(compiled, args),
           "findings": hlo_findings(compiled)}
    out["cost_model_s"] = float(cost.get("optimal_seconds", -1.0))
    if out["cost_model_s"] > 0:  # libtpu 0.0.42 answers -1 (no estimate) for these programs
        out["cost_model_scaled_s"] = out["cost_model_s"] * counted / xla_flops if xla_flops else None
    if chip is not None:
        out["step_s_at_peak"] = counted / chip.peak_bf16_flops
        if out.get("cost_model_scaled_s"):
            out["cost_model_mfu"] = out["step_s_at_peak"] / out["cost_model_scaled_s"]
    return out


def largest_fit(compile_at: Callable[[int], dict], first: int, first_report: dict, max_compiles: int) -> dict:
    """Largest batch per chip whose peak fits, with at most ``max_compiles`` more compiles: double until a
    batch does not fit, then bisect, each guess moved towards where the peak's linear growth (through the
    two nearest compiled batches) meets the capacity."""
    peaks = {first: first_report["memory"]["peak"]}
    capacity = first_report["memory"]["capacity"]
    fits = {first: first_report["memory"]["fits"]}
    compile_s = 0.0
    for _ in range(max_compiles):
        ok = [b for b in fits if fits[b]]
        bad = [b for b in fits if not fits[b]]
        lo, hi = (max(ok) if ok else 0), (min(bad) if bad else None)
        if hi is not None and hi - lo <= 1:
            break
        guess = _linear_guess(peaks, capacity)
        if hi is None:
            guess = max(lo + 1, min(guess or 2 * lo, 4 * lo)) if lo else 1
        else:
            guess = min(max(guess or (lo + hi) // 2, lo + 1), hi - 1)
        report = compile_at(guess)
        compile_s += report["compile_s"]
        peaks[guess], fits[guess] = report["memory"]["peak"], report["memory"]["fits"]
    ok = [b for b in fits if fits[b]]
    bad = [b for b in fits if not fits[b]]
    return {"largest_fitting": max(ok) if ok else 0, "smallest_not_fitting": min(bad) if bad else None,
            "peak_bytes_by_batch": dict(sorted(peaks.items())), "search_compiles": len(peaks) - 1,
            "search_compile_s": round(compile_s, 1), "linear_estimate": _linear_guess(peaks, capacity)}


def _linear_guess(peaks: dict[int, int], capacity: int) -> int | None:
    if len(peaks) < 2:
        return None
    (b0, p0), (b1, p1) = sorted(peaks.items())[-2:] if all(p <= capacity for p in peaks.values()) else \
        sorted(peaks.items(), key=lambda kv: abs(kv[1] - capacity))[:2]
    slope = (p1 - p0) / (b1 - b0) if b1 != b0 else 0
    return int(b0 + (capacity - p0) // slope) if slope > 0 else None


# ------------------------------------------------------------------------------------------------ train


def with_clips_per_chip(config: Any, clips: int, num_chips: int) -> Any:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, global_batch_size=clips * num_chips))


def compile_train(config: Any, devices: Sequence[jax.Device], chip: Chip | None) -> dict:
    """Compile ``train.py``'s step for ``config`` over ``devices``; the per-chip report."""
    from almtok_jax.train import sharding as shard_lib
    from almtok_jax.train.state import make_schedule
    from almtok_jax.train.step import build_train_step

    mesh = shard_lib.make_mesh(config.mesh, devices)
    horizon = config.schedule.total_steps or config.steps or 10_000  # constants of the program only
    warmup = config.schedule.warmup_steps or int(config.schedule.warmup_fraction * horizon)
    setup = build_train_step(config, mesh, make_schedule(config.schedule, config.optimizer.learning_rate,
                                                         horizon, warmup))
    state, frozen, batch = setup.abstract_inputs()
    report = compile_report(setup.train_step, (state, frozen, batch), chip, mesh.size)
    parts = {"trainable": (state.trainable, setup.state_sh.trainable),
             "optimizer": (state.opt_state, setup.state_sh.opt_state),
             "extra": (state.extra, setup.state_sh.extra), "frozen": (frozen, setup.frozen_sh)}
    report["state_bytes"] = {k: part_bytes(t, s) for k, (t, s) in parts.items()}
    clips = config.data.global_batch_size // mesh.size
    report.update(mesh=dict(mesh.shape), clips_per_chip=clips, global_batch=config.data.global_batch_size)
    if chip is not None:
        report["recipe"] = recipe_time(report, config.data.segment_seconds, config.data.global_batch_size)
    return report


def recipe_time(report: dict, segment_seconds: float, global_batch: int) -> dict:
    """Days to train the reference recipe (10k hours of clips, 5 epochs) at the counted FLOPs per step."""
    steps = RECIPE_HOURS * 3600 / segment_seconds * RECIPE_EPOCHS / global_batch
    days = {f"days_at_mfu_{m}": steps * report["step_s_at_peak"] / m / 86400 for m in MFU_RANGE}
    if report.get("cost_model_scaled_s"):
        days["days_cost_model"] = steps * report["cost_model_scaled_s"] / 86400
    return {"steps": round(steps), **days}


def search_train(config: Any, devices: Sequence[jax.Device], chip: Chip | None, max_compiles: int) -> dict:
    """The report at ``config``'s batch (1 clip per chip where the global batch does not split evenly), and
    with ``max_compiles > 0`` the largest clips per chip that fits."""
    n = len(devices)
    clips = config.data.global_batch_size // n if config.data.global_batch_size % n == 0 else 0
    first = compile_train(with_clips_per_chip(config, max(clips, 1), n), devices, chip)
    if max_compiles > 0 and chip is not None:
        first["batch_search"] = largest_fit(
            lambda c: compile_train(with_clips_per_chip(config, c, n), devices, chip), first["clips_per_chip"],
            first, max_compiles)
    return first


def report_train(config: Any, topology: str | None, json_path: str | None, max_compiles: int = 0) -> dict:
    """``train.py --compile-only``: compile, print the table, write the JSON."""
    if config.precision.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.precision.matmul_precision)
    devices, chip = slice_devices(topology) if topology else local_devices()
    report = {"kind": "train", "topology": topology or f"local {jax.default_backend()}", "model": config.model,
              "compute_dtype": config.precision.compute_dtype, "remat": config.remat,
              "fsdp": config.mesh.fsdp, **search_train(config, devices, chip, max_compiles)}
    print(table([report]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


# -------------------------------------------------------------------------------------------- inference


def _cast(tree: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else x.dtype), tree)


def inference_steps(model_config: Any, mesh: Mesh, batch: int, dtype: str) -> dict[str, tuple[Callable, tuple, float]]:
    """``name -> (jitted step, abstract args, audio seconds per row)`` for the tokenizer's encode of
    ``batch`` 12 s segments per chip and one decode window of the model's sampler (its whole ``lax.scan``),
    rows split over the mesh's ``data`` axis, the variables replicated in ``dtype``."""
    from almtok_jax.cli.tokenize import sharded_encode_codes
    from almtok_jax.model import abstract_variables, generate_latents
    from almtok_jax.pipeline import plan_windows

    rows, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                             _cast(abstract_variables(model_config), dtype))
    p = model_config.pipeline
    b = batch * mesh.size

    def arg(shape: tuple, dt: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt, sharding=rows)

    encode = sharded_encode_codes(model_config, "default", mesh)
    plan = plan_windows(int(p.min_duration * p.token_rate) * 4, p)
    latent = (b, plan.latent_frames, model_config.dit.out_channels)
    window = jax.jit(lambda v, c, pr, n, x0: generate_latents(v, c, pr, n, x0, model_config, model_config.sampler),
                     in_shardings=(replicated, rows, rows, rows, rows), out_shardings=rows)
    return {
        "encode": (encode, (variables, arg((b, p.segment_samples + p.segment_extra_samples), jnp.float32)),
                   p.min_duration),
        # Steady state: a window after the first adds its hop of new audio.
        "decode_window": (window, (variables, arg((b, plan.window, model_config.quantizer.rvq.num_quantizers),
                                                   jnp.int32), arg(latent, jnp.float32), arg((b,), jnp.int32),
                                   arg(latent, jnp.float32)), plan.wave_hop / p.sample_rate),
    }


def compile_inference(model_config: Any, devices: Sequence[jax.Device], chip: Chip | None, batch: int, dtype: str,
                      max_compiles: int, steps: Sequence[str] = ("encode", "decode_window")) -> list[dict]:
    """The per-chip report of each of ``steps`` (see :func:`inference_steps`) at ``batch`` rows per chip, with
    ``max_compiles > 0`` the largest batch that fits, and the real-time factor (seconds per audio second)."""
    mesh = Mesh(list(devices), ("data",))

    def one(name: str, b: int) -> dict:
        fn, args, audio_s = inference_steps(model_config, mesh, b, dtype)[name]
        r = compile_report(fn, args, chip, mesh.size)
        r.update(step=name, batch_per_chip=b, dtype=dtype, audio_s_per_row=audio_s)
        if chip is not None:
            for key in ("step_s_at_peak", "cost_model_scaled_s"):
                if r.get(key):
                    rtf = r[key] / (b * audio_s)
                    r[f"rtf_{key}"] = rtf
                    r[f"audio_h_per_chip_h_{key}"] = 1 / rtf
        return r

    out = []
    for name in steps:
        first = one(name, batch)
        if max_compiles > 0 and chip is not None:
            first["batch_search"] = largest_fit(lambda b, n=name: one(n, b), batch, first, max_compiles)
        out.append(first)
    return out


# ---------------------------------------------------------------------------------------------- output


def table(reports: Sequence[dict]) -> str:
    """One line per compiled program: per-chip GiB (arguments, outputs, aliased, temporaries, peak of
    capacity), FLOPs, step time at peak and by the cost model, largest fitting batch."""
    rows = ["| topology | step | dtype | remat | fsdp | batch/chip | args GiB | out GiB | alias GiB | temp GiB "
            "| peak / HBM GiB | fits | TFLOP/chip | s @peak | s cost model | largest batch | compile s |",
            "|---" * 17 + "|"]
    for r in reports:
        m = r["memory"]
        search = r.get("batch_search", {})
        rows.append(
            f"| {r.get('topology', '')} | {r.get('step', 'train')} | {r.get('dtype', r.get('compute_dtype'))} "
            f"| {r.get('remat', '')} | {r.get('fsdp', '')} | {r.get('clips_per_chip', r.get('batch_per_chip'))} "
            f"| {m['argument'] / GIB:.2f} | {m['output'] / GIB:.2f} | {m['alias'] / GIB:.2f} | {m['temp'] / GIB:.2f} "
            f"| {m['peak'] / GIB:.2f} / {m.get('capacity', 0) / GIB:.0f} | {m.get('fits', '')} "
            f"| {r['flops_per_chip'] / 1e12:.2f} | {_fmt(r.get('step_s_at_peak'))} "
            f"| {_fmt(r.get('cost_model_scaled_s'))} | {search.get('largest_fitting', '')} | {r['compile_s']} |")
    return "\n".join(rows)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("inference",), help="train: use train.py --compile-only")
    parser.add_argument("--model", default="almtokenizer2", help="model preset name or YAML")
    parser.add_argument("--topology", default=None, help=f"one of {', '.join(SLICES)}; default: local devices")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=1, help="rows per chip of the first compile")
    parser.add_argument("--search-batch", type=int, default=0, help="at most this many more compiles per step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from almtok_jax.config import load_model_config

    model_config = load_model_config(args.model)
    devices, chip = slice_devices(args.topology) if args.topology else local_devices()
    reports = []
    for dtype in args.dtype:
        for r in compile_inference(model_config, devices, chip, args.batch, dtype, args.search_batch):
            reports.append({"kind": "inference", "topology": args.topology or "local", "model": args.model, **r})
            print(table(reports[-1:]), flush=True)
    print(table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
