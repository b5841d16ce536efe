"""Benchmark of ``extract_features``: 24 kHz segments -> the three frozen experts + fusion -> 25 Hz features.

Full-size (released) architecture with random weights, float32, on the local CPU. For each batch size a
fresh child process builds the variables, compiles (``jit(...).lower(...).compile()``, timed), runs the
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

from common import peak_rss_mib, run_child_process, timed  # noqa: E402

from almtok_jax.audio import LogMelConfig, Resampler, whisper_log_mel  # noqa: E402
from almtok_jax.experts.fusion import ExpertFusion, FusionConfig  # noqa: E402
from almtok_jax.experts.whisper import WhisperConfig, WhisperEncoder, whisper_feature  # noqa: E402

SAMPLE_RATE = 24000


def _experts() -> dict:
    """WavLM and MusicFM: release configs and modules."""
    from almtok_jax.experts.musicfm import MusicFM, MusicFMConfig
    from almtok_jax.experts.wavlm import WavLMConfig, WavLMExpert

    return {"wavlm": (WavLMConfig(), WavLMExpert), "musicfm": (MusicFMConfig(), MusicFM)}


def build(num_samples: int, key: jax.Array) -> tuple[dict, Callable, list[str]]:
    """Random full-size variables and ``extract_features(variables, wav (B, N))``.

    Without WavLM or MusicFM in the checkout, the function returns the expert streams that exist (no fusion).
    """
    experts = _experts()
    k_whisper, k_wavlm, k_musicfm, k_fusion = jax.random.split(key, 4)
    wav = jnp.zeros((1, num_samples), jnp.float32)
    whisper_cfg = WhisperConfig()
    whisper = WhisperEncoder(whisper_cfg)
    transfer = Resampler(SAMPLE_RATE, 16000)
    mel_shape = (1, whisper_cfg.num_mel_frames, whisper_cfg.num_mel_bins)
    variables = {"whisper": jax.jit(whisper.init)(k_whisper, jnp.zeros(mel_shape)),
                 "transfer16k": transfer.init(k_whisper, wav)}
    if "wavlm" in experts:
        cfg, cls = experts["wavlm"]
        variables["wavlm"] = jax.jit(cls(cfg).init)(k_wavlm, wav)
    if "musicfm" in experts:
        cfg, cls = experts["musicfm"]
        variables["musicfm"] = jax.jit(cls(cfg).init)(k_musicfm, wav)
    complete = len(experts) == 2
    fusion = ExpertFusion(FusionConfig())

    def expert_streams(v: dict, audio: jax.Array) -> tuple[jax.Array, ...]:
        """(whisper (B, n_len, 1024)[, wavlm (B, T_w, 768)][, bestrq acoustic, semantic (B, T_b, 1024)])."""
        mel = whisper_log_mel(transfer.apply(v["transfer16k"], audio), LogMelConfig())
        streams = [whisper_feature(whisper.apply(v["whisper"], mel), audio.shape[-1])]
        if "wavlm" in experts:
            cfg, cls = experts["wavlm"]
            streams.append(cls(cfg).apply(v["wavlm"], audio))
        if "musicfm" in experts:
            cfg, cls = experts["musicfm"]
            streams.extend(cls(cfg).apply(v["musicfm"], audio))
        return tuple(streams)

    parts = ["resample 24k->16k", "whisper log-mel", "whisper-medium encoder"] + [
        {"wavlm": "WavLM (to layer 9, with its resampler)", "musicfm": "MusicFM-25Hz (to layer 11)"}[k]
        for k in experts]
    if not complete:
        return variables, expert_streams, parts

    def extract_features(v: dict, audio: jax.Array) -> jax.Array:
        """``(B, N)`` 24 kHz -> ``total_feature (B, T, 768)`` at 25 Hz."""
        return fusion.apply(v["fusion"], *expert_streams(v, audio))

    probe = jax.eval_shape(expert_streams, variables, wav)
    variables["fusion"] = fusion.init(k_fusion, *[jnp.zeros(x.shape, x.dtype) for x in probe])
    parts.append("fusion glue")
    return variables, extract_features, parts


def run_child(batch: int, seconds: float, repeats: int) -> dict:
    num_samples = int(seconds * SAMPLE_RATE) + 240
    t0 = time.perf_counter()
    variables, extract_features, parts = build(num_samples, jax.random.key(0))
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    wav = jax.random.uniform(jax.random.key(1), (batch, num_samples), jnp.float32, -0.5, 0.5)
    t0 = time.perf_counter()
    compiled = jax.jit(extract_features).lower(variables, wav).compile()
    compile_s = time.perf_counter() - t0
    times, out = timed(compiled, variables, wav, repeats=repeats)
    shapes = [list(x.shape) for x in jax.tree.leaves(out)]
    return {"batch": batch, "num_samples": num_samples, "seconds_per_segment": num_samples / SAMPLE_RATE,
            "parts": parts, "n_variables_floats": int(n_params), "init_s": init_s, "compile_s": compile_s,
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
              "dtype": "float32", "weights": "random, full-size architecture", "results": results}
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
