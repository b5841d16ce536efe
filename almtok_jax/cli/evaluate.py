"""Reconstruction benchmark: PESQ (WB and NB), STOI, MS-STFT loss, mel distance and SI-SDR over a data set.

Two modes::

    python -m almtok_jax.cli.evaluate --checkpoint DIR --data DIR_OR_LIST -o OUT [--batch-size 4] [--save-audio]
    python -m almtok_jax.cli.evaluate --references-only REF_DIR DEG_DIR -o OUT

``--checkpoint`` tokenizes and detokenizes every clip of ``--data`` (a folder searched recursively, an
audio file, or a text file with one path per line) with ``ALMTokenizer2.load(DIR)`` and scores the
reconstruction against the original file. ``--references-only`` scores two folders of audio against each
other, matched by relative path without extension (``a/x.wav`` matches ``a/x.flac``).

Outputs in ``OUT``: ``metrics.csv`` (one row per clip, an ``error`` column holding the reason of every
metric that could not be computed), ``summary.json`` (``metrics`` maps each metric to ``{mean, std,
count}`` over the clips where it is defined, and per category when the clips come from subfolders, plus
failure counts, the bitrate and the settings), ``plots/*.png`` (original and reconstructed spectrograms
side by side) and ``listen/*.wav`` (both signals as 16-bit WAV) for the first ``--plots`` clips, and
``report.html``: one page to open in a browser, with the summary, every clip's metrics and players for the
listened clips (:mod:`almtok_jax.cli.report`).
Metric definitions: :mod:`almtok_jax.metrics`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from almtok_jax import metrics
from almtok_jax.audio import AudioError, load_audio, resample, to_mono
from almtok_jax.cli.report import category_of, write_report

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
LENGTH_TOLERANCE_S = 0.1  # a reconstruction may differ from its reference by about a token frame (80 ms)
CSV_COLUMNS = ("file", "duration_s", *metrics.METRIC_NAMES, "error")
PLOT_DB_RANGE = 80.0
REPORT_LABELS = ("original", "reconstruction")


@dataclass(frozen=True)
class Clip:
    """One item: its name (relative path, no extension), the original file and, if any, the degraded one."""

    name: str
    reference: Path
    degraded: Path | None = None


# --------------------------------------------------------------------------------------------- data


def list_audio(data: Path, option: str = "--data") -> list[Clip]:
    """Clips of a folder (recursive), a single audio file, or a list file (one path per line, ``#`` comments).

    Relative paths in a list file are taken relative to the list file's folder. ``option`` names the
    command-line option that gave ``data``, for the error messages.
    """
    data = Path(data)
    if data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        clips = [Clip(p.relative_to(data).with_suffix("").as_posix(), p) for p in paths]
    elif data.suffix.lower() in AUDIO_EXTENSIONS:
        clips = [Clip(data.stem, data)]
    elif data.is_file():
        lines = [line.strip() for line in data.read_text().splitlines()]
        entries = [Path(line) for line in lines if line and not line.startswith("#")]
        clips = [Clip(p.with_suffix("").as_posix(), data.parent / p) for p in entries]
    else:
        raise FileNotFoundError(f"{option} {data}: no such folder or file")
    if not clips:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found in {data}")
    return clips


def match_folders(reference_dir: Path, degraded_dir: Path) -> tuple[list[Clip], list[str]]:
    """Pair two folders' files by relative path without extension: ``(clips, unmatched degraded names)``.

    A reference without a degraded file gets ``degraded=None`` (an error row); names are unique per folder.
    """
    references = list_audio(reference_dir, "--references-only REF_DIR")
    degraded = {}
    for clip in list_audio(degraded_dir, "--references-only DEG_DIR"):
        if clip.name in degraded:
            raise ValueError(f"{degraded_dir}: two files named {clip.name!r} "
                             f"({degraded[clip.name]}, {clip.reference})")
        degraded[clip.name] = clip.reference
    names = [c.name for c in references]
    if len(set(names)) != len(names):
        raise ValueError(f"{reference_dir}: file names are not unique without their extension")
    clips = [Clip(c.name, c.reference, degraded.get(c.name)) for c in references]
    return clips, sorted(set(degraded) - set(names))


def load_clip(path: Path) -> tuple[np.ndarray, int]:
    """A file as mono float32 ``(N,)`` at its own rate."""
    wav, sample_rate = load_audio(path)
    return to_mono(wav), sample_rate


# ------------------------------------------------------------------------------------------ scoring


def score_row(name: str, reference: np.ndarray, reference_sr: int, degraded: np.ndarray,
              degraded_sr: int) -> dict[str, Any]:
    """One CSV row: the metrics of a pair, and the reasons of those that failed in ``error``. Signals whose
    durations differ by more than :data:`LENGTH_TOLERANCE_S` are not scored (an error row, out of the means):
    trimmed to the shorter one, a reconstruction of half the clip would score as a perfect one."""
    duration_s, degraded_s = reference.shape[-1] / reference_sr, degraded.shape[-1] / degraded_sr
    if abs(duration_s - degraded_s) > LENGTH_TOLERANCE_S:
        return error_row(name, f"length mismatch: the reference lasts {duration_s:.2f} s, the degraded signal "
                               f"{degraded_s:.2f} s (more than {LENGTH_TOLERANCE_S} s apart): not scored",
                         duration_s)
    values, errors = metrics.compute_metrics(reference, degraded, reference_sr, degraded_sr)
    return {"file": name, "duration_s": duration_s, **values, "error": _join_errors(errors)}


def error_row(name: str, reason: str, duration_s: float | None = None) -> dict[str, Any]:
    return {"file": name, "duration_s": duration_s, "error": reason}


def _join_errors(errors: dict[str, str]) -> str:
    reasons = set(errors.values())
    if len(errors) == len(metrics.METRIC_NAMES) and len(reasons) == 1:
        return f"all metrics: {reasons.pop()}"
    return "; ".join(f"{name}: {reason}" for name, reason in errors.items())


def metric_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean/std/count per metric over the rows where it is defined."""
    stats = {}
    for name in metrics.METRIC_NAMES:
        vals = np.array([r[name] for r in rows if r.get(name) is not None], dtype=np.float64)
        stats[name] = {"mean": float(vals.mean()) if vals.size else None,
                       "std": float(vals.std()) if vals.size else None, "count": int(vals.size)}
    return stats


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics`` (:func:`metric_stats`), failure counts and, when clips come from subfolders,
    ``categories`` (the same per first subfolder, :func:`~almtok_jax.cli.report.category_of`)."""
    stats = metric_stats(rows)
    summary: dict[str, Any] = {"metrics": stats,
                               "metric_failures": {name: len(rows) - s["count"] for name, s in stats.items()}}
    summary["files"] = len(rows)
    summary["files_with_errors"] = sum(1 for r in rows if r.get("error"))
    if any("/" in r["file"] for r in rows):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(category_of(r["file"]), []).append(r)
        summary["categories"] = {c: {"files": len(g), "metrics": metric_stats(g)} for c, g in sorted(groups.items())}
    return summary


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["file"]):
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def settings_of_metrics() -> dict[str, Any]:
    return {
        "eval_sample_rate": metrics.EVAL_SAMPLE_RATE,
        "pesq": "ludlows pesq, P.862 (nb) and P.862.2 (wb) at 16 kHz",
        "stoi": "pystoi classic STOI (extended=False) at 16 kHz",
        "mrstft_resolutions": [list(r) for r in metrics.MRSTFT_RESOLUTIONS],
        "mrstft_power_floor": metrics.MRSTFT_POWER_FLOOR,
        "mel_scales": [list(s) for s in metrics.MEL_SCALES],
        "mel_floor": metrics.MEL_FLOOR,
        "min_seconds": metrics.MIN_SECONDS,
        "silence_dbfs": metrics.SILENCE_DBFS,
        "alignment": f"mono, resampled to 16 kHz, trimmed to the shorter signal; pairs whose lengths differ by "
                     f"more than {LENGTH_TOLERANCE_S} s are not scored (error rows, out of the means)",
    }


# ---------------------------------------------------------------------------------------------- plots


def save_spectrogram_plot(path: Path, name: str, reference: np.ndarray, reference_sr: int,
                          degraded: np.ndarray, degraded_sr: int, values: dict[str, Any],
                          labels: tuple[str, str] = ("original", "reconstruction")) -> None:
    """PNG of both log-magnitude spectrograms side by side, at the lower of the two rates, one dB scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sr = min(reference_sr, degraded_sr)
    pair = [np.asarray(resample(x, s, sr)) if s != sr else x for x, s in ((reference, reference_sr),
                                                                           (degraded, degraded_sr))]
    n = min(x.size for x in pair)
    mags = [metrics.stft_magnitude(x[:n].astype(np.float64), 1024, 256, 1024) for x in pair]
    specs = [20 * np.log10(np.maximum(m, 1e-5)).T for m in mags]
    vmax = float(specs[0].max())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True, constrained_layout=True)
    extent = (0.0, n / sr, 0.0, sr / 2000)
    for ax, spec, label in zip(axes, specs, labels, strict=True):
        image = ax.imshow(spec, origin="lower", aspect="auto", extent=extent, cmap="magma",
                          vmin=vmax - PLOT_DB_RANGE, vmax=vmax)
        ax.set_title(label)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("frequency (kHz)")
    fig.colorbar(image, ax=axes, label="dB")
    shown = [k for k in ("pesq_wb", "stoi", "mrstft") if values.get(k) is not None]
    scores = ", ".join(f"{k} {values[k]:.3f}" for k in shown)
    fig.suptitle(f"{name}   {scores}")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_path(out: Path, name: str) -> Path:
    return out / "plots" / (name.replace("/", "__") + ".png")


def plot_or_note(out: Path, name: str, notes: dict[str, str], *pair_and_values: Any, **labels: Any) -> None:
    """:func:`save_spectrogram_plot`; a failure (a clip too short for the STFT, say) becomes ``notes[name]``
    and a warning, never the end of the run."""
    try:
        save_spectrogram_plot(_plot_path(out, name), name, *pair_and_values, **labels)
    except Exception as e:  # noqa: BLE001 - a plot is an extra: no failure of it may cost the metrics
        notes[name] = f"{type(e).__name__}: {e}"
        tqdm.write(f"warning: no plot for {name}: {notes[name]}", file=sys.stderr)


def listening_entry(out: Path, name: str, notes: dict[str, str], reference: np.ndarray, reference_sr: int,
                    degraded: np.ndarray, degraded_sr: int, values: dict[str, Any],
                    labels: tuple[str, str] = REPORT_LABELS) -> dict[str, Path | None]:
    """A clip of the report: its spectrogram plot (:func:`plot_or_note`) and both signals as 16-bit WAV
    files under ``out/listen`` (what every browser plays); returns their paths."""
    plot_or_note(out, name, notes, reference, reference_sr, degraded, degraded_sr, values, labels=labels)
    files: dict[str, Path | None] = {}
    for key, wav, sr in (("original", reference, reference_sr), ("reconstruction", degraded, degraded_sr)):
        files[key] = out / "listen" / f"{name}.{key}.wav"
        files[key].parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(files[key]), np.clip(wav, -1.0, 1.0), sr, subtype="PCM_16")
    files["spectrogram"] = _plot_path(out, name) if name not in notes else None
    return files


# ------------------------------------------------------------------------------------- references-only


def evaluate_folders(reference_dir: Path, degraded_dir: Path, out: Path, plots: int = 4) -> dict[str, Any]:
    """Score every reference file against the same-named degraded file; writes the CSV, JSON and plots."""
    start = time.time()
    clips, unmatched = match_folders(reference_dir, degraded_dir)
    _make_out(out, plots)
    rows, plot_failures, media = [], {}, {}
    labels = ("reference", "degraded")
    for clip in tqdm(clips, desc="scoring", unit="clip"):
        if clip.degraded is None:
            rows.append(error_row(clip.name, f"no degraded file named {clip.name}.* in {degraded_dir}"))
            continue
        try:
            ref, ref_sr = load_clip(clip.reference)
            deg, deg_sr = load_clip(clip.degraded)
        except AudioError as e:
            rows.append(error_row(clip.name, str(e)))
            continue
        rows.append(score_row(clip.name, ref, ref_sr, deg, deg_sr))
        if len(media) < plots:
            media[clip.name] = listening_entry(out, clip.name, plot_failures, ref, ref_sr, deg, deg_sr, rows[-1],
                                               labels)
    summary = summarize(rows)
    summary.update(mode="references_only", bitrate_bps=None, unmatched_degraded=unmatched, plot_failures=plot_failures,
                   settings={**settings_of_metrics(), "reference_dir": str(reference_dir),
                             "degraded_dir": str(degraded_dir)},
                   elapsed_s=time.time() - start)
    _write_outputs(rows, summary, out, media, labels)
    return summary


# ----------------------------------------------------------------------------------------------- model


def load_tokenizer(checkpoint: Path, compat: str = "default") -> Any:
    """``ALMTokenizer2.from_pretrained(checkpoint, compat)``, imported here so scoring alone does not load the model."""
    from almtok_jax.tokenizer import ALMTokenizer2

    return ALMTokenizer2.from_pretrained(checkpoint, compat=compat)


def reconstruct_batch(model: Any, wavs: Sequence[np.ndarray], steps: int | None = None, seed: int = 0,
                      progress: Any = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Encode and decode clips at ``model.sample_rate`` together: ``(reconstructions, codes)``.

    Uses the tokenizer's batched calls (``encode_batch`` -> codes ``(Q, T_i)`` per clip, ``decode_clips``
    with each clip's length), so every clip is reconstructed exactly as it would be alone. ``progress``
    (:data:`~almtok_jax.tokenizer.WindowProgress`) is told after each segment batch and window.
    """
    codes = model.encode_batch(list(wavs), model.sample_rate, progress=progress)
    results = model.decode_clips(codes, steps=steps, seed=seed, lengths=[w.size for w in wavs], progress=progress)
    return [np.asarray(r["wave"], np.float32) for r in results], codes


def _window(bar: tqdm, stage: str, done: int, total: int) -> None:
    bar.set_postfix_str(f"{stage} {done}/{total}")


def _batches_by_length(clips: list[Clip], batch_size: int) -> Iterator[list[Clip]]:
    """Batches of clips of similar duration (longest first), so little of each batch is padding."""

    def duration(clip: Clip) -> float:
        try:
            info = sf.info(str(clip.reference))
            return info.frames / info.samplerate
        except (sf.LibsndfileError, RuntimeError, OSError):
            return 0.0  # unreadable: fails on load, with its reason, in its batch

    ordered = sorted(clips, key=duration, reverse=True)
    for i in range(0, len(ordered), batch_size):
        yield ordered[i:i + batch_size]


def _bitrate(model: Any, token_rate_hz: float | None, codebooks: int | None) -> float | None:
    if getattr(model, "bitrate", None) is not None:
        return float(model.bitrate)
    size = getattr(model, "codebook_size", None)
    if size and token_rate_hz and codebooks:
        return token_rate_hz * codebooks * math.log2(size)
    return None


def codec_settings(model: Any, checkpoint: Path, compat: str, steps: int | None, seed: int) -> dict[str, Any]:
    """What the report states about the codec run: mode, sampler and its cost per window."""
    sampler = model.sampler_config(steps)
    return {"compat": compat, "checkpoint": str(checkpoint), "seed": seed,
            "sampler": f"{sampler.solver}, {sampler.num_steps} {sampler.time_grid} steps, "
                       f"guidance {sampler.guidance_scale:g}",
            "evaluations_per_window": sampler.evaluations}


def evaluate_model(checkpoint: Path, data: Path, out: Path, plots: int = 4, batch_size: int = 4,
                   save_audio: bool = False, steps: int | None = None, seed: int = 0,
                   compat: str = "default") -> dict[str, Any]:
    """Reconstruct each clip of ``data`` with the tokenizer at ``checkpoint``, score it, write the outputs."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    start = time.time()
    clips = list_audio(data)
    model = load_tokenizer(checkpoint, compat)
    model_sr = int(model.sample_rate)
    _make_out(out, plots)
    if save_audio:
        (out / "audio").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    token_frames, audio_seconds, codebooks, plot_failures, media = 0, 0.0, None, {}, {}
    progress = tqdm(total=len(clips), desc="reconstructing", unit="clip")
    for batch in _batches_by_length(clips, batch_size):
        loaded = []
        for clip in batch:
            try:
                loaded.append((clip, *load_clip(clip.reference)))
            except AudioError as e:
                rows.append(error_row(clip.name, str(e)))
        progress.update(len(batch) - len(loaded))
        if not loaded:
            continue
        inputs = [np.asarray(resample(w, sr, model_sr)) if sr != model_sr else w for _, w, sr in loaded]
        try:
            recs, codes = reconstruct_batch(model, inputs, steps, seed, functools.partial(_window, progress))
        except Exception as e:  # noqa: BLE001 - a failing batch is recorded per clip, the run goes on
            rows.extend(error_row(c.name, f"reconstruction failed: {type(e).__name__}: {e}", w.size / sr)
                        for c, w, sr in loaded)
            progress.update(len(loaded))
            continue
        token_frames += sum(np.shape(c)[-1] for c in codes)
        audio_seconds += sum(x.size for x in inputs) / model_sr
        codebooks = int(np.shape(codes[0])[0])
        for (clip, wav, sr), rec in zip(loaded, recs, strict=True):
            rows.append(score_row(clip.name, wav, sr, rec, model_sr))
            if save_audio:
                path = out / "audio" / f"{clip.name}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), rec, model_sr, subtype="FLOAT")
            if len(media) < plots:
                media[clip.name] = listening_entry(out, clip.name, plot_failures, wav, sr, rec, model_sr, rows[-1])
        progress.update(len(loaded))
    progress.close()
    token_rate = token_frames / audio_seconds if audio_seconds else None
    summary = summarize(rows)
    summary.update(mode="model", bitrate_bps=_bitrate(model, token_rate, codebooks), token_rate_hz=token_rate,
                   codebooks=codebooks, plot_failures=plot_failures,
                   codec=codec_settings(model, checkpoint, compat, steps, seed),
                   settings={**settings_of_metrics(), "checkpoint": str(checkpoint), "data": str(data),
                             "model_sample_rate": model_sr, "batch_size": batch_size, "steps": steps,
                             "seed": seed, "compat": compat},
                   elapsed_s=time.time() - start)
    _write_outputs(rows, summary, out, media, REPORT_LABELS)
    return summary


# ------------------------------------------------------------------------------------------------ CLI


def _make_out(out: Path, plots: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if plots > 0:
        (out / "plots").mkdir(exist_ok=True)


def _write_outputs(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path,
                   media: dict[str, dict[str, Path | None]], labels: tuple[str, str]) -> None:
    write_csv(rows, out / "metrics.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, rows, media, metrics.METRIC_NAMES, labels)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m almtok_jax.cli.evaluate",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", type=Path,
                   help="model directory, release folder or hub repo id (Dongchao/almtokenizer2); a "
                   "release is converted once into the cache (ALMTokenizer2.from_pretrained)")
    mode.add_argument("--references-only", nargs=2, type=Path, metavar=("REF_DIR", "DEG_DIR"),
                      help="score two folders of audio against each other, no model")
    parser.add_argument("--data", type=Path,
                        help="folder, audio file or list file of clips (with --checkpoint)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--plots", type=int, default=4,
                        help="spectrogram PNGs and report players for the first N clips (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per model call (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler noise")
    parser.add_argument("--compat", choices=("default", "release"), default="default",
                        help="'release' reproduces the reference pipeline exactly")
    parser.add_argument("--save-audio", action="store_true",
                        help="also write the reconstructions to OUT/audio")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.data is None:
        parser.error("--checkpoint needs --data")
    if args.references_only is not None and args.data is not None:
        parser.error("--data is not used with --references-only")
    return args


def scored_files(summary: dict[str, Any]) -> int:
    """Clips with at least one metric: the most any metric's count reaches."""
    return max((stats["count"] for stats in summary["metrics"].values()), default=0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI and return the summary; exits with status 1 (after writing the outputs) when no clip
    could be scored, and with a one-line message for bad paths or a broken model directory."""
    args = parse_args(argv)
    try:
        if args.references_only is not None:
            summary = evaluate_folders(*args.references_only, args.output, plots=args.plots)
        else:
            summary = evaluate_model(args.checkpoint, args.data, args.output, plots=args.plots,
                                     batch_size=args.batch_size, save_audio=args.save_audio, steps=args.steps,
                                     seed=args.seed, compat=args.compat)
    except (FileNotFoundError, ValueError) as e:  # ModelDirError is a ValueError
        raise SystemExit(f"error: {e}") from None
    for name, stats in summary["metrics"].items():
        mean = "n/a" if stats["mean"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"
        print(f"{name:>13s}: {mean}  (n={stats['count']})", file=sys.stderr)
    print(f"{summary['files']} files, {summary['files_with_errors']} with errors -> {args.output}",
          file=sys.stderr)
    if not scored_files(summary):
        raise SystemExit(f"error: no clip could be scored ({summary['files']} files, every one failed or had "
                         f"no match); see {args.output / 'metrics.csv'}")
    return summary


def command(argv: Sequence[str] | None = None) -> int:
    """``almtok-evaluate``: :func:`main` (which returns the summary) as a command."""
    main(argv)
    return 0


if __name__ == "__main__":
    main()
