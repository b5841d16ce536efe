"""Codec benchmark: encode and decode real-time factors, compile time and peak memory of ALMTokenizer2.

Run by hand from the repo root (not in CI)::

    python benchmarks/bench_codec.py --out results.json [--sizes tiny full] [--batch 1 8] [--full-batch 1]
                                     [--dtypes float32 bfloat16] [--steps 2] [--repeats 3]

Sizes: ``full`` = ``configs/almtokenizer2.yaml`` (released architecture), ``tiny`` =
``configs/tiny_release.yaml``, both with fresh weights (the modules' own initializers, as training starts; real
filter banks / resampling kernel / position table). Units: an encode *segment* and a decode *window* are
both 12 s of 24 kHz audio.

* encode = ``encode_segments`` (experts + fusion + query encoder + RVQ) on ``B`` segments of the real music
  in ``../shared/audio/music``. The experts and the quantizer are always float32, so encode is measured once
  per (size, batch), not per dtype.
* decode = ``generate_latents`` (dequantize + DiT flow sampler, Euler, CFG 1.5 so the DiT sees ``2B`` rows)
  on ``B`` windows of random codes (first window: no in-context prompt; a prompt costs the same), then
  ``decode_latents`` (SQ codec decoder). ``bfloat16`` is the DiT's ``dtype`` switch (bf16 matmuls/convs, fp32
  parameters, residual stream, norms and softmax); the quantizer and SQ codec stay float32. Only
  ``--steps`` sampler steps are run (the release uses 50); the 50-step time is extrapolated as
  ``50 / steps * sampler time + SQ decode time`` and labelled as such.

Every (size, batch, stage[, dtype]) runs in its own child process: it builds only the variables its stage
uses, compiles (``lower().compile()``, timed separately), runs the compiled function (tiny: one untimed
warm-up run then ``--repeats`` timed runs; full: ``--full-repeats`` timed runs, no warm-up) and reports its
peak RSS (``ru_maxrss``: Python + JAX runtime + random weights + compilation + XLA buffers, a process-wide
high-water mark) and the 1-minute load average before and after. RTF = wall seconds / seconds of audio
(below 1 is faster than real time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import current_rss_mib, machine, model_variables, peak_rss_mib, run_child_process, timed  # noqa: E402

from almtok_jax.audio import load_mono  # noqa: E402
from almtok_jax.config import ALMTokenizer2Config, load_model_config  # noqa: E402
from almtok_jax.model import decode_latents, encode_segments, generate_latents  # noqa: E402
from almtok_jax.pipeline import plan_windows, segment_audio  # noqa: E402

PRESETS = {"tiny": "tiny_release", "full": "almtokenizer2"}
MUSIC = REPO.parent / "shared" / "audio" / "music"
ENCODE_PARTS = ("whisper", "wavlm", "musicfm", "fusion", "quantizer")
DECODE_PARTS = ("quantizer", "flow", "sqcodec")


def model_config(size: str, dtype: str) -> ALMTokenizer2Config:
    config = load_model_config(PRESETS[size])
    return dataclasses.replace(config, dit=dataclasses.replace(config.dit, dtype=dtype))


def stage_variables(config: ALMTokenizer2Config, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Fresh variables of the named components and what they cost: float count and the process RSS once
    built."""
    variables = model_variables(config, names, jax.random.key(0))
    count = sum(x.size for x in jax.tree.leaves(variables))
    return variables, {"components": list(names), "weights_millions": round(count / 1e6, 2),
                       "rss_after_weights_mib": current_rss_mib()}


def music_segments(batch: int, config: ALMTokenizer2Config) -> np.ndarray:
    """``(batch, S + 240)`` encode segments cut from the music clips in turn (clip 0's segments first)."""
    clips = [load_mono(p, config.pipeline.sample_rate) for p in sorted(MUSIC.glob("*.wav"))]
    if not clips:
        raise FileNotFoundError(f"no .wav files in {MUSIC}")
    segments = np.concatenate([segment_audio(c, config.pipeline) for c in clips])
    return segments[np.arange(batch) % len(segments)].astype(np.float32)


def _runs(compiled, args: tuple, repeats: int, warmup: bool) -> tuple[list[float], object]:
    if warmup:
        jax.block_until_ready(compiled(*args))
    return timed(compiled, *args, repeats=repeats)


def _compile(fn, *args, **static) -> tuple[object, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def bench_encode(config: ALMTokenizer2Config, batch: int, repeats: int, warmup: bool) -> dict:
    variables, weights = stage_variables(config, ENCODE_PARTS)
    segments = jnp.asarray(music_segments(batch, config))
    compiled, compile_s = _compile(encode_segments, variables, segments, config=config)
    times, _ = _runs(compiled, (variables, segments), repeats, warmup)
    audio_s = batch * config.pipeline.min_duration
    return {**weights, "encode_compile_s": compile_s, "encode_run_s": times, "encode_s": min(times),
            "encode_rtf": min(times) / audio_s, "segment_samples": int(segments.shape[1])}


def bench_decode(config: ALMTokenizer2Config, batch: int, steps: int, repeats: int, warmup: bool) -> dict:
    variables, weights = stage_variables(config, DECODE_PARTS)
    p = config.pipeline
    plan = plan_windows(int(p.min_duration * p.token_rate), p)
    k_codes, k_noise = jax.random.split(jax.random.key(1))
    rvq = config.quantizer.rvq
    codes = jax.random.randint(k_codes, (batch, plan.window, rvq.num_quantizers), 0, rvq.codebook_size)
    x0 = jax.random.normal(k_noise, (batch, plan.latent_frames, config.dit.out_channels))
    prompt, prompt_len = jnp.zeros_like(x0), jnp.zeros((batch,), jnp.int32)
    sampler = dataclasses.replace(config.sampler, num_steps=steps)
    gen, gen_compile_s = _compile(generate_latents, variables, codes, prompt, prompt_len, x0,
                                  config=config, sampler=sampler)
    gen_times, latents = _runs(gen, (variables, codes, prompt, prompt_len, x0), repeats, warmup)
    sq, sq_compile_s = _compile(decode_latents, variables, latents, config=config)
    sq_times, _ = _runs(sq, (variables, latents), repeats, warmup)
    audio_s = batch * p.min_duration
    full_steps = config.sampler.num_steps
    measured = min(gen_times) + min(sq_times)
    extrapolated = min(gen_times) * full_steps / steps + min(sq_times)
    dit_rows = 2 * batch if sampler.guidance_scale > 1 else batch
    return {**weights, "steps_measured": steps, "guidance_scale": sampler.guidance_scale,
            "dit_rows": dit_rows, "latent_frames": plan.latent_frames,
            "sampler_compile_s": gen_compile_s, "sq_compile_s": sq_compile_s,
            "sampler_run_s": gen_times, "sq_run_s": sq_times, "sampler_step_s": min(gen_times) / steps,
            "decode_measured_s": measured, "decode_measured_rtf": measured / audio_s,
            "steps_extrapolated": full_steps, "decode_extrapolated_s": extrapolated,
            "decode_extrapolated_rtf": extrapolated / audio_s}


def child(spec: dict) -> dict:
    load_before = os.getloadavg()[0]
    config = model_config(spec["size"], spec["dtype"])
    warmup = spec["size"] == "tiny"
    if spec["stage"] == "encode":
        out = bench_encode(config, spec["batch"], spec["repeats"], warmup)
    else:
        out = bench_decode(config, spec["batch"], spec["steps"], spec["repeats"], warmup)
    return {**spec, **out, "warmup_runs": int(warmup), "peak_rss_mib": peak_rss_mib(),
            "load1_before": load_before, "load1_after": os.getloadavg()[0]}


def plan(args: argparse.Namespace) -> list[dict]:
    """Children in run order: all tiny configurations first, then the full size."""
    specs = []
    for size in args.sizes:
        batches = args.batch if size == "tiny" else args.full_batch
        repeats = args.repeats if size == "tiny" else args.full_repeats
        for batch in batches:
            specs.append({"size": size, "stage": "encode", "batch": batch, "dtype": "float32",
                          "repeats": repeats})
            specs += [{"size": size, "stage": "decode", "batch": batch, "dtype": dtype, "repeats": repeats,
                       "steps": args.steps} for dtype in args.dtypes]
    return specs


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(results: list[dict], skipped: list[str]) -> str:
    """Two Markdown tables (encode, decode) of the measured children."""
    enc = ["| size | batch | compile s | encode s | RTF | peak RSS MiB |", "|---|---|---|---|---|---|"]
    dec = ["| size | batch | DiT dtype | compile s (sampler + SQ) | measured: steps, s | s / step "
           "| SQ decode s | extrapolated 50 steps s | RTF (50 steps, extrap.) | peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["stage"] == "encode":
            enc.append(f"| {r['size']} | {r['batch']} | {_fmt(r['encode_compile_s'], 1)} "
                       f"| {_fmt(r['encode_s'])} | {_fmt(r['encode_rtf'], 3)} | {r['peak_rss_mib']:.0f} |")
        else:
            dec.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {_fmt(r['sampler_compile_s'], 1)} + "
                       f"{_fmt(r['sq_compile_s'], 1)} "
                       f"| {r['steps_measured']}: {_fmt(min(r['sampler_run_s']))} "
                       f"| {_fmt(r['sampler_step_s'])} | {_fmt(min(r['sq_run_s']))} "
                       f"| {_fmt(r['decode_extrapolated_s'], 1)} | {_fmt(r['decode_extrapolated_rtf'], 3)} "
                       f"| {r['peak_rss_mib']:.0f} |")
    notes = [f"- not measured: {s}" for s in skipped]
    return "\n".join(["Encode (12 s segments of real music, float32):", *enc, "",
                      "Decode (12 s windows, Euler + CFG 1.5; 50-step figures extrapolated from the measured "
                      "steps):", *dec, *([""] + notes if notes else [])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(PRESETS), default=["tiny", "full"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="tiny batch sizes")
    parser.add_argument("--full-batch", type=int, nargs="+", default=[1, 8], help="full-size batch sizes")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=2, help="sampler steps actually run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tiny configuration")
    parser.add_argument("--full-repeats", type=int, default=1, help="timed runs per full-size configuration")
    parser.add_argument("--out", type=Path, help="JSON results file (rewritten after every configuration)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = plan(args)
    skipped = [f"full size, batch {b}" for b in (1, 8) if "full" in args.sizes and b not in args.full_batch]
    report = {"machine_start": machine(), "notes": {
        "rtf": "wall seconds / seconds of audio (batch x 12 s); below 1 is faster than real time",
        "weights": "random, N(0, 0.02); real resampling kernel, MusicFM mel bank/window, DiT position table",
        "bfloat16": "DiT dtype switch only (bf16 matmuls/convs, fp32 params); experts, quantizer and "
                    "SQ codec stay fp32",
        "decode_extrapolated_s": "sampler time x 50 / steps_measured + SQ decode time (extrapolated, "
                                 "not measured)",
        "peak_rss_mib": "ru_maxrss of the child process running only that configuration's stage",
        "timing": "tiny: 1 untimed warm-up then min of --repeats runs; full: --full-repeats runs, no warm-up",
        "skipped": skipped}, "results": []}
    for spec in specs:
        print(f"running {spec}", file=sys.stderr, flush=True)
        result = run_child_process(__file__, ["--child", json.dumps(spec)])
        report["results"].append(result)
        report["machine_end"] = machine()
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report["results"], skipped))
    print(f"\nload average (1, 5, 15 min): start {report['machine_start']['loadavg']}, "
          f"end {report['machine_end']['loadavg']}; {report['machine_start']['cpu_count']} CPUs")


if __name__ == "__main__":
    main()
