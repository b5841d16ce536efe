"""How far each sampler setting lands from the converged flow ODE solution (not a test). From the repo root:

    python benchmarks/bench_fidelity.py --model DIR [--audio ../shared/audio/speech] [--clips 4] \
        [--seed 0] [--settings midpoint:uniform:6,8] [--out benchmarks/results/fidelity]

For a trained flow decoder (any model directory: ``train.py --export``, ``convert_torch_weights.py``) this
encodes real clips, takes the first decoding window of each (no prompt), and samples it with every
(solver, time grid, step count) setting from the same initial noise and guidance (1.5), and with the
reference solution (``--reference rk4:512``). With ``--student DIR`` (a model directory of ``train.py
--export`` from the distillation task, ``configs/distill_tiny.yaml``) it adds the student's rows at
``--student-steps`` from the same codes and noise, and for every row the mel distance, PESQ and STOI of its
audio against the teacher's Euler-50 audio (each clip cut to its length); ``--long S`` also decodes an
S-second concatenation of the clips through the long-audio windows (prompt re-imposed) with the teacher's
RK4-4 / Euler-50 and the student, against the teacher's RK4-64. Per setting it reports the latent relative L2 error
``‖x − x_ref‖ / ‖x_ref‖`` and the SQ-decoded waveform relative L2 error against the reference solution
(over all clips together), the estimator evaluations and DiT passes per window (a guided evaluation is a
doubled batch: two passes). A setting **qualifies** when both
errors are at most those of Euler with 50 uniform steps (the reference's sampler). Writes ``fidelity.md``
(a markdown table, cheapest qualifying setting marked), ``fidelity.json`` and ``fidelity.png`` (error vs
estimator evaluations) under ``--out``.

``--roughness`` measures instead how smooth the guided velocity is in t (issue 14: the DiT's timestep
features are ``sin/cos(1000·t·f)``, periods down to 2π/1000 ≈ 0.0063, so an estimator that has not learnt
to ignore the fast ones is rough in t below any useful step size). For the first clip's condition and two
fixed states, the initial noise ``x0`` and the path midpoint ``x½ = (1 − (1 − σ)/2)·x0 + ½·x1`` (``x1`` the
clip's Euler-50 latents), it evaluates ``v(x, t)`` on ``--roughness-points`` uniform t in [0, 1] and
reports, per state, ``v`` against its moving average over a window of width 0.02 (one Euler-50 step) as
``‖v − v̄‖ / ‖v‖`` (interior points), the share of the detrended, Hann-windowed spectrum above 50 and 100
cycles per unit t (periods below 0.02 / 0.01), and the field's time scale ``‖v‖ / ‖∂v/∂t‖`` (finite
differences on the grid). Writes ``roughness.json`` and ``roughness.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from almtok_jax.flow.cfm import (  # noqa: E402
    RELEASE_SAMPLER,
    SamplerConfig,
    estimator_variables,
    fill_padding,
    guided_velocity,
    incontext_latents,
    inference_masks,
)
from almtok_jax.flow.dit import DiTEstimator  # noqa: E402
from almtok_jax.metrics import MetricError, mel_distance, pesq_score, prepare_pair, stoi_score  # noqa: E402
from almtok_jax.model import condition, decode_latents, generate_latents  # noqa: E402
from almtok_jax.pipeline import plan_windows, window_codes  # noqa: E402
from almtok_jax.tokenizer import ALMTokenizer2  # noqa: E402

# (solver, time grid, step counts)
SETTINGS = [
    ("euler", "uniform", (10, 16, 25, 50, 100)),
    ("euler", "cosine", (16, 25, 50)),
    ("midpoint", "uniform", (3, 4, 6, 8, 12, 16)),
    ("midpoint", "cosine", (3, 4, 6, 8)),
    ("heun", "uniform", (3, 4, 5, 6, 8, 12, 16)),
    ("heun", "cosine", (4, 6, 8, 12)),
    ("heun", "power", (4, 6, 8, 12)),
    ("rk4", "uniform", (2, 3, 4, 6, 8)),
    ("rk4", "cosine", (2, 3, 4, 6)),
    ("ab2", "uniform", (6, 8, 10, 12, 16, 25, 50)),
    ("ab2", "cosine", (8, 12, 16, 25)),
]


def first_windows(tok: ALMTokenizer2, files: list[Path], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(B, W, Q)`` of the first decoding window of each clip and its initial noise ``(B, T_w, C)``."""
    codes, noise = [], []
    for f in files:
        wav, sr = sf.read(f, dtype="float32", always_2d=True)
        c = tok.encode(wav.T, sr)
        plan = plan_windows(c.shape[-1], tok.pipeline, tok.compat)
        codes.append(window_codes(c, plan)[0].T)
        noise.append(tok.window_noise(c, plan, seed)[0])
    return np.stack(codes), np.stack(noise)


def parse_settings(specs: list[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``SOLVER:GRID:STEPS[,STEPS]`` strings -> :data:`SETTINGS` rows, with Euler 50 uniform (the bar) added."""
    settings = [("euler", "uniform", (50,))]
    for spec in specs:
        solver, grid, counts = spec.split(":")
        steps = tuple(int(c) for c in counts.split(",") if (solver, grid, int(c)) != ("euler", "uniform", 50))
        if steps:
            settings.append((solver, grid, steps))
    return settings


def relative_l2(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio" / "speech")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="rk4:512", help="converged solution, SOLVER:STEPS")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fidelity")
    parser.add_argument("--settings", nargs="+", default=None, metavar="SOLVER:GRID:STEPS[,STEPS]",
                        help="run only these settings (Euler 50 uniform, the bar, is always added)")
    parser.add_argument("--roughness", action="store_true", help="measure v(x, t) on a fine t grid instead")
    parser.add_argument("--roughness-points", type=int, default=4000)
    parser.add_argument("--student", type=Path, default=None, help="a distilled student's model directory")
    parser.add_argument("--student-steps", default="1,2,4,8", help="student step counts")
    parser.add_argument("--long", type=float, default=0.0, help="also decode this many seconds of the clips "
                        "through the long-audio windows")
    args = parser.parse_args()

    tok = ALMTokenizer2.load(args.model)
    files = sorted(args.audio.glob("*.wav"))[: args.clips]
    codes, x0 = first_windows(tok, files, args.seed)
    prompt, prompt_len = np.zeros_like(x0), np.zeros((len(x0),), np.int32)
    base = replace(RELEASE_SAMPLER, guidance_scale=args.guidance)
    if args.roughness:
        return roughness(tok, codes[:1], x0[:1], base, args)

    def run(sampler: SamplerConfig, model: ALMTokenizer2 = tok) -> tuple[np.ndarray, np.ndarray]:
        latents = generate_latents(model.variables, codes, prompt, prompt_len, x0, model.config, sampler)
        return np.asarray(latents), np.asarray(decode_latents(model.variables, latents, model.config))

    def add_row(sampler: SamplerConfig, name: str, model: ALMTokenizer2 = tok) -> None:
        lat, wav = run(sampler, model)
        rows.append(dict(solver=name, grid=sampler.time_grid, steps=sampler.num_steps,
                         evaluations=sampler.evaluations, passes=sampler.passes,
                         latent_rel_l2=relative_l2(lat, ref_lat), wave_rel_l2=relative_l2(wav, ref_wav), wave=wav))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "wave"}), flush=True)

    ref_solver, ref_steps = args.reference.split(":")
    start = time.perf_counter()
    ref_lat, ref_wav = run(replace(base, solver=ref_solver, num_steps=int(ref_steps)))
    print(f"reference {args.reference}: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for solver, grid, counts in parse_settings(args.settings) if args.settings else SETTINGS:
        for steps in counts:
            add_row(replace(base, solver=solver, time_grid=grid, num_steps=steps), solver)
    student = ALMTokenizer2.load(args.student) if args.student else None
    for steps in (int(n) for n in args.student_steps.split(",")) if student else ():
        add_row(replace(student.config.sampler, num_steps=steps), "student " + student.config.sampler.solver,
                student)

    bar = next(r for r in rows if (r["solver"], r["grid"], r["steps"]) == ("euler", "uniform", 50))
    if student:
        lengths = [int(round(sf.info(f).frames * tok.sample_rate / sf.info(f).samplerate)) for f in files]
        for r in rows:
            r.update(audio_scores(r["wave"], bar["wave"], lengths, tok.sample_rate))
    for r in rows:
        del r["wave"]
    for r in rows:
        r["qualifies"] = r["latent_rel_l2"] <= bar["latent_rel_l2"] and r["wave_rel_l2"] <= bar["wave_rel_l2"]
    best = min((r for r in rows if r["qualifies"]), key=lambda r: (r["evaluations"], r["latent_rel_l2"]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(args.model), clips=[f.name for f in files], window_frames=int(x0.shape[1]),
                guidance=args.guidance, reference=args.reference, seed=args.seed,
                student=str(args.student) if student else None)
    long = long_clip(tok, student, files, args.long) if student and args.long else None
    (args.out / "fidelity.json").write_text(json.dumps(dict(meta=meta, rows=rows, best=best, long=long), indent=1))
    audio = student is not None
    table = ["| solver | grid | steps | estimator evaluations | DiT passes | latent rel. L2 | waveform rel. L2 | "
             + ("mel dist. | PESQ | STOI | " if audio else "") + "qualifies |",
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if audio else "") + "---|"]
    for r in sorted(rows, key=lambda r: (r["passes"], r["latent_rel_l2"])):
        mark = "**cheapest**" if r is best else ("yes" if r["qualifies"] else "")
        scores = f"{r['mel_distance']:.3f} | {r['pesq']:.2f} | {r['stoi']:.3f} | " if audio else ""
        table.append(f"| {r['solver']} | {r['grid']} | {r['steps']} | {r['evaluations']} | {r['passes']} | "
                     f"{r['latent_rel_l2']:.2e} | {r['wave_rel_l2']:.2e} | {scores}{mark} |")
    if long:
        table += ["", f"Long-audio path: {long['seconds']:.0f} s ({long['windows']} windows, prompt re-imposed), "
                  "waveform rel. L2 to the teacher's RK4-64:", "",
                  "| decoder | DiT passes per window | waveform rel. L2 |", "|---|---|---|"]
        table += [f"| {r['name']} | {r['passes']} | {r['wave_rel_l2']:.2e} |" for r in long["rows"]]
    (args.out / "fidelity.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    plot(rows, bar, args.out / "fidelity.png")


def audio_scores(wave: np.ndarray, ref: np.ndarray, lengths: list[int], sample_rate: int) -> dict:
    """Mean over clips of mel distance, PESQ-WB and STOI of ``wave (B, N)`` against ``ref (B, N)`` (each clip
    cut to its own length); a metric undefined for a clip (e.g. too short for PESQ) is left out of its mean."""
    scores: dict[str, list[float]] = {"mel_distance": [], "pesq": [], "stoi": []}
    for w, r, n in zip(wave, ref, lengths, strict=True):
        a, b = prepare_pair(r[:n], w[:n], sample_rate)
        for name, fn in (("mel_distance", mel_distance), ("pesq", pesq_score), ("stoi", stoi_score)):
            try:
                scores[name].append(fn(a, b))
            except MetricError:
                pass
    return {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}


def long_clip(tok: ALMTokenizer2, student: ALMTokenizer2, files: list[Path], seconds: float) -> dict:
    """The clips concatenated (tiled) to ``seconds``, decoded through the long-audio windows (prompt
    re-imposed) by the teacher (RK4-64 as reference, RK4-4, Euler-50) and the student at its own sampler."""
    wav = np.concatenate([sf.read(f, dtype="float32", always_2d=True)[0].mean(axis=1) for f in files])
    n = int(seconds * tok.sample_rate)
    wav = np.tile(wav, n // len(wav) + 1)[:n]
    codes = tok.encode(wav, tok.sample_rate)
    ref = tok.decode(codes, 64, solver="rk4", length=n)
    rows = []
    for name, model, steps, solver in (("teacher Euler-50", tok, 50, "euler"), ("teacher RK4-4", tok, 4, "rk4"),
                                       *((f"student {k}-step", student, k, None) for k in (1, 2, 4))):
        out = model.decode(codes, steps, solver=solver, length=n)
        rows.append(dict(name=name, passes=model.sampler_config(steps, None, solver).passes,
                         wave_rel_l2=relative_l2(out, ref)))
        print(json.dumps(rows[-1]), flush=True)
    windows = plan_windows(codes.shape[-1], tok.pipeline, tok.compat, n).num_windows
    return dict(seconds=seconds, windows=windows, reference="teacher rk4:64", rows=rows)


def roughness(tok: ALMTokenizer2, codes: np.ndarray, x0: np.ndarray, sampler: SamplerConfig,
              args: argparse.Namespace, chunk: int = 25) -> None:
    """The ``--roughness`` measurement (module docstring) for one clip: ``codes (1, W, Q)``, ``x0 (1, T, C)``."""
    import jax.numpy as jnp

    frames = x0.shape[1]
    masks = inference_masks(frames, jnp.full((1,), frames), jnp.zeros((1,), jnp.int32))
    mu = fill_padding(condition(tok.variables, jnp.asarray(codes), tok.config), masks,
                      tok.variables["flow"]["params"]["zero_cond_embedding1"])
    prompt = incontext_latents(jnp.zeros_like(x0), masks)
    estimator, est_vars = DiTEstimator(tok.config.dit), estimator_variables(tok.variables["flow"])

    @jax.jit
    def field(x: jax.Array, ts: jax.Array) -> jax.Array:  # (1, T, C), (K,) -> (K, T·C)
        def one(t: jax.Array) -> jax.Array:
            return guided_velocity(lambda h, tt: estimator.apply(est_vars, h, tt), x, prompt, mu, t,
                                   sampler.guidance_scale)[0].reshape(-1)
        return jax.vmap(one)(ts)

    x1 = np.asarray(generate_latents(tok.variables, codes, np.zeros_like(x0), np.zeros((1,), np.int32), x0,
                                     tok.config, sampler))
    sigma = sampler.sigma_min
    states = {"noise x0": x0, "midpoint x1/2": (1 - (1 - sigma) / 2) * x0 + 0.5 * x1}
    n = args.roughness_points
    ts = np.linspace(0.0, 1.0, n).astype(np.float32)
    pad = (-n) % chunk
    ts_padded = np.concatenate([ts, np.ones(pad, np.float32)])
    results, curves = [], {}
    for name, x in states.items():
        start = time.perf_counter()
        x = jnp.asarray(x, jnp.float32)
        v = np.concatenate([np.asarray(field(x, ts_padded[i:i + chunk])) for i in range(0, n + pad, chunk)])[:n]
        v = v.astype(np.float64)
        row = dict(state=name, points=n, seconds=time.perf_counter() - start, **roughness_figures(ts, v))
        results.append(row)
        curves[name] = v
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(args.model), guidance=sampler.guidance_scale, seed=args.seed, window_frames=frames)
    (args.out / "roughness.json").write_text(json.dumps(dict(meta=meta, rows=results), indent=1))
    plot_roughness(ts, curves, args.out / "roughness.png", str(args.model))


def roughness_figures(ts: np.ndarray, v: np.ndarray, width: float = 0.02) -> dict:
    """Roughness in t of ``v (P, N)`` sampled at the uniform ``ts (P,)`` (module docstring)."""
    h = float(ts[1] - ts[0])
    k = max(1, int(round(width / h)) // 2)  # moving average over 2k + 1 points
    kernel = np.ones(2 * k + 1) / (2 * k + 1)
    smooth = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, v)
    inner = v[k:len(v) - k]
    trend = np.polynomial.polynomial.polyvander(ts, 1) @ np.linalg.lstsq(
        np.polynomial.polynomial.polyvander(ts, 1), v, rcond=None)[0]
    power = (np.abs(np.fft.rfft((v - trend) * np.hanning(len(ts))[:, None], axis=0)) ** 2).sum(axis=1)
    freq = np.fft.rfftfreq(len(ts), d=h)  # cycles per unit t
    deriv = np.diff(v, axis=0) / h
    return dict(rel_l2_minus_smoothed=float(np.linalg.norm(inner - smooth) / np.linalg.norm(inner)),
                smoothing_width=(2 * k + 1) * h,
                spectrum_share_above_50=float(power[freq > 50].sum() / power[1:].sum()),
                spectrum_share_above_100=float(power[freq > 100].sum() / power[1:].sum()),
                time_scale=float(np.sqrt((v ** 2).mean() / (deriv ** 2).mean())))


def plot_roughness(ts: np.ndarray, curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, v in curves.items():
        axes[0].plot(ts, v[:, :3], lw=0.6, label=[f"{name} [{i}]" for i in range(3)])
        detrended = v - np.linspace(v[0], v[-1], len(v))
        power = (np.abs(np.fft.rfft(detrended * np.hanning(len(ts))[:, None], axis=0)) ** 2).sum(axis=1)
        axes[1].loglog(np.fft.rfftfreq(len(ts), d=float(ts[1] - ts[0]))[1:], power[1:], lw=0.8, label=name)
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("guided velocity (3 coordinates)")
    axes[0].legend(fontsize=6)
    axes[1].axvline(1000 / (2 * np.pi), color="k", ls=":", lw=1, label="fastest timestep feature")
    axes[1].set_xlabel("cycles per unit t")
    axes[1].set_ylabel("power (detrended, Hann)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(rows: list[dict], bar: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("latent_rel_l2", "wave_rel_l2"), ("latent", "SQ-decoded waveform"),
                              strict=True):
        for i, (solver, grid) in enumerate(dict.fromkeys((r["solver"], r["grid"]) for r in rows)):
            part = [r for r in rows if (r["solver"], r["grid"]) == (solver, grid)]
            ax.loglog([r["passes"] for r in part], [r[key] for r in part], "o-" if grid == "uniform" else "s--",
                      color=plt.cm.tab20(i % 20), label=f"{solver} {grid}")
        ax.axhline(bar[key], color="k", ls=":", lw=1, label="Euler 50 (reference sampler)")
        ax.set_xlabel("DiT passes per window")
        ax.set_ylabel("relative L2 error vs converged solution")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main()
