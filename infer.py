"""Reconstruct or tokenize audio with a converted ALMTokenizer2.

    python infer.py --checkpoint DIR INPUT... [-o OUTDIR]        # <name>.wav + <name>.codes.npy per input
    python infer.py --checkpoint DIR --encode-only INPUT...      # codes only
    python infer.py --checkpoint DIR --decode CODES.npy...       # codes -> <name>.wav

INPUT are audio files (wav, flac, ogg; any sample rate; stereo is mixed to mono) or folders of them.
Codes are ``(8, T)`` integer arrays: codebook x 12.5 Hz frame. A file that cannot be processed is reported
and skipped (exit status 1 at the end); outputs are written atomically, so a failed input leaves no file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


def expand_inputs(paths: list[Path], suffixes: set[str]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the files with the given suffixes."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes)
        else:
            files.append(p)
    return files


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_wav(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    write_atomic(path, lambda tmp: sf.write(tmp, wav, sample_rate, subtype="FLOAT", format="WAV"))


def save_codes(path: Path, codes: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, codes.astype(np.int64))

    write_atomic(path, write)


def load_codes(path: Path, num_codebooks: int) -> np.ndarray:
    codes = np.load(path, allow_pickle=False)
    if codes.ndim != 2 or codes.shape[0] != num_codebooks or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{path}: codes must be an integer array of shape ({num_codebooks}, T), "
                         f"got {codes.dtype} {codes.shape}")
    return codes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="model directory (convert_torch_weights.py)")
    p.add_argument("inputs", nargs="*", type=Path, help="audio files or folders")
    p.add_argument("-o", "--outdir", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--encode-only", action="store_true", help="write codes only")
    p.add_argument("--decode", nargs="+", type=Path, metavar="CODES.npy", help="decode code files instead")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model config's; release mode: the reference's 50)")
    p.add_argument("--solver", default=None, help="ODE solver: euler, midpoint, heun, rk4, ab2 (default: the "
                   "model config's; release mode runs euler only)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler noise")
    p.add_argument("--noise", type=Path, default=None,
                   help="initial ODE noise (K, T_w, C) .npy for a single input (parity tests)")
    p.add_argument("--compat", choices=("default", "release"), default="default",
                   help="'release' reproduces the reference infer.py exactly, defects included")
    p.add_argument("--batch-size", type=int, default=4, help="clips decoded together")
    args = p.parse_args(argv)
    if not args.inputs and not args.decode:
        p.error("give audio INPUTs or --decode CODES.npy")
    if args.decode and (args.inputs or args.encode_only):
        p.error("--decode takes code files only (no audio inputs, no --encode-only)")
    return args


class Progress:
    """A tqdm bar over files that also reports seconds of audio processed per second."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)
        self.start, self.audio_s, self.done, self.failed = time.perf_counter(), 0.0, 0, []

    def ok(self, seconds: float) -> None:
        self.audio_s += seconds
        self.done += 1
        self._step()

    def fail(self, name: str, error: Exception) -> None:
        self.failed.append(name)
        message = str(error)
        self.bar.write(f"error: {message}" if name in message else f"error: {name}: {message}")
        self._step()

    def _step(self) -> None:
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.audio_s / max(elapsed, 1e-9):.2f} audio s/s")
        self.bar.update(1)

    def summary(self) -> str:
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        return (f"{self.done} done, {len(self.failed)} failed, {self.audio_s:.1f} s of audio in {elapsed:.1f} s "
                f"({self.audio_s / max(elapsed, 1e-9):.2f} audio s/s)")


def run(args: argparse.Namespace) -> int:
    from almtok_jax.audio import load_audio
    from almtok_jax.tokenizer import ALMTokenizer2

    tok = ALMTokenizer2.load(args.checkpoint, compat=args.compat)
    try:
        tok.sampler_config(args.steps, args.guidance, args.solver)
    except ValueError as e:  # a bad --solver/--steps fails once, before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    noise = np.load(args.noise, allow_pickle=False) if args.noise else None
    if args.decode:
        files = expand_inputs(args.decode, {".npy"})
    else:
        files = expand_inputs(args.inputs, AUDIO_SUFFIXES)
    if noise is not None and len(files) != 1:
        print("error: --noise needs exactly one input", file=sys.stderr)
        return 2
    progress = Progress(len(files))

    def output_name(f: Path) -> str:
        return f.name.removesuffix(".npy").removesuffix(".codes") if args.decode else f.stem

    def decode_batch(batch: list[tuple[Path, np.ndarray, int | None]]) -> None:
        """Decode clips together; on failure retry one by one so one bad clip fails alone."""
        try:
            results = tok.decode_clips([c for _, c, _ in batch], args.steps, args.guidance, args.seed,
                                       [noise] * len(batch), [n for _, _, n in batch], args.solver)
        except Exception as e:  # one bad clip must not stop the run
            if len(batch) == 1:
                progress.fail(str(batch[0][0]), e)
            else:
                for item in batch:
                    decode_batch([item])
            return
        for (f, codes, _), r in zip(batch, results, strict=True):
            if not args.decode:
                save_codes(args.outdir / f"{output_name(f)}.codes.npy", codes)
            save_wav(args.outdir / f"{output_name(f)}.wav", r["wave"], tok.sample_rate)
            progress.ok(len(r["wave"]) / tok.sample_rate)

    pending: list[tuple[Path, np.ndarray, int | None]] = []  # (file, codes, output length) to decode
    for f in files:
        try:
            if args.decode:
                pending.append((f, load_codes(f, tok.num_codebooks), None))
            else:
                wav, sr = load_audio(f)
                wav24 = tok.to_model_rate(wav.mean(axis=0), sr)
                codes = tok.encode_clips([wav24])[0]["codes"]
                if args.encode_only:
                    save_codes(args.outdir / f"{output_name(f)}.codes.npy", codes)
                    progress.ok(len(wav24) / tok.sample_rate)
                    continue
                pending.append((f, codes, None if args.compat == "release" else len(wav24)))
        except Exception as e:  # report the file and go on with the others
            progress.fail(str(f), e)
            continue
        if len(pending) >= args.batch_size:
            decode_batch(pending)
            pending = []
    if pending:
        decode_batch(pending)
    print(progress.summary())
    return 1 if progress.failed else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
