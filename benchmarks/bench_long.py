"""Real-time factor of decoding one long clip (not a test). From the repo root:

    python benchmarks/bench_long.py --model DIR [--seconds 60] [--setting euler:50:uniform heun:8:cosine]

Encodes ``--seconds`` of the shared music (clips concatenated), then decodes the codes once per sampler
setting (``SOLVER:STEPS:GRID``) in default mode: the windows of one clip are sequential (each continues the
previous one), so this is the latency of a single long file. Each setting is decoded twice; the first run
compiles, the second is timed. RTF = decode wall seconds / audio seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from almtok_jax.pipeline import plan_windows  # noqa: E402
from almtok_jax.tokenizer import ALMTokenizer2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio" / "music")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--setting", nargs="+", default=["euler:50:uniform"])
    args = parser.parse_args()

    tok = ALMTokenizer2.load(args.model)
    clips = [sf.read(p, dtype="float32", always_2d=True)[0].mean(axis=1) for p in sorted(args.audio.glob("*.wav"))]
    wav = np.concatenate(clips)
    n = int(args.seconds * tok.sample_rate)
    wav = np.tile(wav, n // len(wav) + 1)[:n]
    codes = tok.encode(wav, tok.sample_rate)
    for setting in args.setting:
        solver, steps, grid = setting.split(":")
        tok.config = replace(tok.config, sampler=replace(tok.config.sampler, time_grid=grid))
        sampler = tok.sampler_config(int(steps), None, solver)
        tok.decode(codes, int(steps), solver=solver, length=n)  # compiles
        start = time.perf_counter()
        out = tok.decode(codes, int(steps), solver=solver, length=n)
        elapsed = time.perf_counter() - start
        windows = plan_windows(codes.shape[-1], tok.pipeline, tok.compat, n).num_windows
        print(f"{setting}: {args.seconds:.0f} s clip, {windows} windows x {sampler.evaluations} estimator "
              f"evaluations: {elapsed:.1f} s, RTF {elapsed / args.seconds:.3f} ({len(out)} samples)", flush=True)


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main()
