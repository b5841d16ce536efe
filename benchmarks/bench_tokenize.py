"""Tokenization encode throughput: audio seconds encoded per second at batch 1 vs a packed batch, and the
full-size encode's achieved FLOP/s against a large matmul measured in the same run.

Run by hand from the repo root (not in CI; the full size takes minutes on a small CPU)::

    python benchmarks/bench_tokenize.py --out tokenize.json [--sizes tiny full] [--tiny-batch 1 8]
                                        [--full-batch 1 2] [--repeats 3]

What runs is the tokenizer's device step, :func:`almtok_jax.cli.tokenize.sharded_encode_codes`: ``(B, S)``
12 s segments -> codes, ``B`` split over a one-axis mesh of every local device, on segments of the real
music in ``../shared/audio/music``, with random weights of the real shapes (``bench_codec.component_variables``).
``B = 1`` is what encoding one file of up to 12 s at a time gives; a packed batch is what the tokenizer
builds from the segments of many files. Each (size, batch) runs in its own child process: compile (timed
apart), then tiny: one warm-up and the best of ``--repeats`` runs, full: ``--full-repeats`` runs.

FLOPs: XLA's ``cost_analysis`` counts the body of every scanned layer stack once, so the benchmark also
counts the matmul and convolution FLOPs (2 x MACs) of the traced program, dead code removed, with every
``scan`` multiplied by its length (:func:`almtok_jax.flops.matmul_flops`); the achieved rate uses that
count. The reference rate is the best of 3 fp32 ``2048^3`` matmuls in the same child process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_codec import ENCODE_PARTS, model_config, music_segments, stage_variables  # noqa: E402
from bench_dit import matmul_gflops  # noqa: E402
from common import machine, peak_rss_mib, run_child_process, timed  # noqa: E402

from almtok_jax.cli.tokenize import sharded_encode_codes  # noqa: E402
from almtok_jax.flops import matmul_flops  # noqa: E402


def child(spec: dict) -> dict:
    load_before = os.getloadavg()[0]
    config = model_config(spec["size"], "float32")
    variables, weights = stage_variables(config, ENCODE_PARTS)
    segments = music_segments(spec["batch"], config)
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    fn = sharded_encode_codes(config, "default", mesh)
    start = time.perf_counter()
    compiled = fn.lower(variables, segments).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = matmul_flops(fn, variables, segments)
    if spec["warmup"]:
        jax.block_until_ready(compiled(variables, segments))
    times, _ = timed(compiled, variables, segments, repeats=spec["repeats"])
    best = min(times)
    reference = matmul_gflops()
    audio_s = spec["batch"] * config.pipeline.min_duration
    return {**spec, **weights, "devices": mesh.size, "compile_s": compile_s, "run_s": times,
            "audio_s_per_s": audio_s / best, "rtf": best / audio_s, "matmul_conv_gflop": flops / 1e9,
            "xla_cost_analysis_gflop": float(cost.get("flops", float("nan"))) / 1e9,
            "achieved_gflops": flops / best / 1e9, "matmul_2048_gflops": reference,
            "fraction_of_matmul_rate": flops / best / 1e9 / reference, "peak_rss_mib": peak_rss_mib(),
            "load1_before": load_before, "load1_after": os.getloadavg()[0]}


def markdown(results: list[dict]) -> str:
    rows = ["| size | batch | compile s | encode s | audio s / s | GFLOP (counted) | achieved GFLOP/s "
            "| 2048³ matmul GFLOP/s | fraction | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['size']} | {r['batch']} | {r['compile_s']:.1f} | {min(r['run_s']):.2f} "
                    f"| {r['audio_s_per_s']:.2f} | {r['matmul_conv_gflop']:.1f} | {r['achieved_gflops']:.1f} "
                    f"| {r['matmul_2048_gflops']:.1f} | {r['fraction_of_matmul_rate']:.2f} "
                    f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "full"], default=["tiny", "full"])
    parser.add_argument("--tiny-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--full-batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tiny configuration")
    parser.add_argument("--full-repeats", type=int, default=1, help="timed runs per full-size configuration")
    parser.add_argument("--out", type=Path, help="JSON results (rewritten after every configuration)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = [{"size": "tiny", "batch": b, "repeats": args.repeats, "warmup": True}
             for b in args.tiny_batch if "tiny" in args.sizes]
    specs += [{"size": "full", "batch": b, "repeats": args.full_repeats, "warmup": False}
              for b in args.full_batch if "full" in args.sizes]
    report = {"machine_start": machine(), "results": []}
    for spec in specs:
        print(f"running {spec}", file=sys.stderr, flush=True)
        report["results"].append(run_child_process(__file__, ["--child", json.dumps(spec)]))
        report["machine_end"] = machine()
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report["results"]))
    print(f"\nload average (1, 5, 15 min): start {report['machine_start']['loadavg']}, "
          f"end {report['machine_end']['loadavg']}; {report['machine_start']['cpu_count']} CPUs")


if __name__ == "__main__":
    main()
