"""How far each sampler setting lands from the converged flow ODE solution (not a test). From the repo root:

    python benchmarks/bench_fidelity.py --model DIR [--audio ../shared/audio/speech] [--clips 4] \
        [--out benchmarks/results/fidelity]

For a trained flow decoder (any model directory: ``train.py --export``, ``convert_torch_weights.py``) this
encodes real clips, takes the first decoding window of each (no prompt), and samples it with every
(solver, time grid, step count) setting from the same initial noise and guidance (1.5), and with the
reference solution (``--reference rk4:512``). Per setting it reports the latent relative L2 error
``‖x − x_ref‖ / ‖x_ref‖`` and the SQ-decoded waveform relative L2 error against the reference solution
(over all clips together), and the estimator evaluations per window. A setting **qualifies** when both
errors are at most those of Euler with 50 uniform steps (the reference's sampler). Writes ``fidelity.md``
(a markdown table, cheapest qualifying setting marked), ``fidelity.json`` and ``fidelity.png`` (error vs
estimator evaluations) under ``--out``.
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

from almtok_jax.flow.cfm import RELEASE_SAMPLER, SamplerConfig  # noqa: E402
from almtok_jax.model import decode_latents, generate_latents  # noqa: E402
from almtok_jax.pipeline import plan_windows, window_codes  # noqa: E402
from almtok_jax.tokenizer import ALMTokenizer2  # noqa: E402

# (solver, time grid, step counts)
SETTINGS = [
    ("euler", "uniform", (10, 16, 25, 50, 100)),
    ("euler", "cosine", (16, 25, 50)),
    ("midpoint", "uniform", (4, 8, 12, 16)),
    ("heun", "uniform", (4, 6, 8, 12, 16)),
    ("heun", "cosine", (4, 6, 8, 12)),
    ("heun", "power", (4, 6, 8, 12)),
    ("rk4", "uniform", (2, 3, 4, 6, 8)),
    ("rk4", "cosine", (2, 3, 4, 6)),
    ("ab2", "uniform", (8, 12, 16, 25, 50)),
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
    args = parser.parse_args()

    tok = ALMTokenizer2.load(args.model)
    files = sorted(args.audio.glob("*.wav"))[: args.clips]
    codes, x0 = first_windows(tok, files, args.seed)
    prompt, prompt_len = np.zeros_like(x0), np.zeros((len(x0),), np.int32)
    base = replace(RELEASE_SAMPLER, guidance_scale=args.guidance)

    def run(sampler: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
        latents = generate_latents(tok.variables, codes, prompt, prompt_len, x0, tok.config, sampler)
        return np.asarray(latents), np.asarray(decode_latents(tok.variables, latents, tok.config))

    ref_solver, ref_steps = args.reference.split(":")
    start = time.perf_counter()
    ref_lat, ref_wav = run(replace(base, solver=ref_solver, num_steps=int(ref_steps)))
    print(f"reference {args.reference}: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for solver, grid, counts in SETTINGS:
        for steps in counts:
            sampler = replace(base, solver=solver, time_grid=grid, num_steps=steps)
            lat, wav = run(sampler)
            rows.append(dict(solver=solver, grid=grid, steps=steps, evaluations=sampler.evaluations,
                             latent_rel_l2=relative_l2(lat, ref_lat), wave_rel_l2=relative_l2(wav, ref_wav)))
            print(json.dumps(rows[-1]), flush=True)

    bar = next(r for r in rows if (r["solver"], r["grid"], r["steps"]) == ("euler", "uniform", 50))
    for r in rows:
        r["qualifies"] = r["latent_rel_l2"] <= bar["latent_rel_l2"] and r["wave_rel_l2"] <= bar["wave_rel_l2"]
    best = min((r for r in rows if r["qualifies"]), key=lambda r: (r["evaluations"], r["latent_rel_l2"]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(args.model), clips=[f.name for f in files], window_frames=int(x0.shape[1]),
                guidance=args.guidance, reference=args.reference, seed=args.seed)
    (args.out / "fidelity.json").write_text(json.dumps(dict(meta=meta, rows=rows, best=best), indent=1))
    table = ["| solver | grid | steps | estimator evaluations | latent rel. L2 | waveform rel. L2 | qualifies |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["evaluations"], r["latent_rel_l2"])):
        mark = "**cheapest**" if r is best else ("yes" if r["qualifies"] else "")
        table.append(f"| {r['solver']} | {r['grid']} | {r['steps']} | {r['evaluations']} | "
                     f"{r['latent_rel_l2']:.2e} | {r['wave_rel_l2']:.2e} | {mark} |")
    (args.out / "fidelity.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    plot(rows, bar, args.out / "fidelity.png")


def plot(rows: list[dict], bar: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("latent_rel_l2", "wave_rel_l2"), ("latent", "SQ-decoded waveform"),
                              strict=True):
        for solver, grid in dict.fromkeys((r["solver"], r["grid"]) for r in rows):
            part = [r for r in rows if (r["solver"], r["grid"]) == (solver, grid)]
            ax.loglog([r["evaluations"] for r in part], [r[key] for r in part], "o-", label=f"{solver} {grid}")
        ax.axhline(bar[key], color="k", ls=":", lw=1, label="Euler 50 (reference sampler)")
        ax.set_xlabel("estimator evaluations per window")
        ax.set_ylabel("relative L2 error vs converged solution")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    with jax.default_matmul_precision("highest"):
        main()
