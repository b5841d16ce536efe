"""Benchmark of ``extract_features``: 24 kHz segments -> the three frozen experts + fusion -> 25 Hz features.

Full-size (released) architecture with fresh weights (the modules' own initializers), float32, on the local
CPU (``expert_streams`` + ``fused_features`` of :mod:`almtok_jax.model`). For each batch size a fresh child
process builds the variables, compiles (``jit(...).lower(...).compile()``, timed), runs the
compiled function ``--repeats`` times (wall time of each, after ``block_until_ready``) and reports the
process's peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: weights + XLA buffers +
the Python/JAX runtime, a process-wide high-water mark, hence one process per batch size).

Usage: ``python benchmarks/bench_experts.py [--batch 1 4] [--seconds 12] [--repeats 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import model_variables, peak_rss_mib, run_child_process, timed  # noqa: E402

from almtok_jax.config import load_model_config  # noqa: E402
from almtok_jax.model import expert_streams, fused_features  # noqa: E402

CONFIG = load_model_config("almtokenizer2")
SAMPLE_RATE = CONFIG.pipeline.sample_rate
PARTS = ("whisper", "wavlm", "musicfm", "fusion")


def build(key: jax.Array) -> tuple[dict, Callable]:
    """Fresh full-size variables of the experts and the fusion, and ``extract_features(variables, wav)``."""

    def extract_features(v: dict, audio: jax.Array) -> jax.Array:
        """``(B, N)`` 24 kHz -> fused features ``(B, T, codec_dim)`` at 25 Hz (:mod:`almtok_jax.model`)."""
        return fused_features(v, expert_streams(v, audio, CONFIG), CONFIG)

    return model_variables(CONFIG, PARTS, key), extract_features


def run_child(batch: int, seconds: float, repeats: int) -> dict:
    num_samples = int(seconds * SAMPLE_RATE) + 240
    t0 = time.perf_counter()
    variables, extract_features = build(jax.random.key(0))
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    wav = jax.random.uniform(jax.random.key(1), (batch, num_samples), jnp.float32, -0.5, 0.5)
    t0 = time.perf_counter()
    compiled = jax.jit(extract_features).lower(variables, wav).compile()
    compile_s = time.perf_counter() - t0
    times, out = timed(compiled, variables, wav, repeats=repeats)
    shapes = [list(x.shape) for x in jax.tree.leaves(out)]
    return {"batch": batch, "num_samples": num_samples, "seconds_per_segment": num_samples / SAMPLE_RATE,
            "parts": list(PARTS), "n_variables_floats": int(n_params), "init_s": init_s, "compile_s": compile_s,
            "run_s": times, "run_s_min": min(times), "output_shapes": shapes,
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_child(args.child, args.seconds, args.repeats)))
        return
    results = []
    for batch in args.batch:
        results.append(run_child_process(__file__, ["--child", str(batch), "--seconds", str(args.seconds),
                                                    "--repeats", str(args.repeats)]))
    report = {"device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
              "dtype": "float32", "weights": "fresh (modules' initializers), full-size architecture",
              "results": results}
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(f"\nparts: {', '.join(results[0]['parts'])}")
    header = ("batch", "audio s", "compile s", "run s (min)", "x realtime", "peak RSS MiB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 8, 10, 12, 11, 13), strict=True)))
    for r in results:
        audio = r["batch"] * r["seconds_per_segment"]
        print(f"{r['batch']:>5} {audio:>8.1f} {r['compile_s']:>10.1f} {r['run_s_min']:>12.2f} "
              f"{audio / r['run_s_min']:>11.2f} {r['peak_rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
