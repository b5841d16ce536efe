"""Reconstruct or tokenize audio with a converted ALMTokenizer2.

    python infer.py --checkpoint DIR INPUT... [-o OUTDIR]        # <name>.wav + <name>.codes.npy per input
    python infer.py --checkpoint DIR --encode-only INPUT...      # codes only
    python infer.py --checkpoint DIR --decode CODES.npy...       # codes -> <name>.wav

INPUT are audio files (wav, flac, ogg; any sample rate; stereo is mixed to mono) or folders of them; the
outputs of a folder's files mirror its tree under OUTDIR. Codes are ``(8, T)`` integer arrays: codebook x
12.5 Hz frame, each in [0, codebook size). A file that cannot be processed (or saved) is reported and
skipped (exit status 1 at the end); outputs are written atomically, so a failed input leaves no file.
Checked before any work (exit status 2): outputs that would overwrite an input or each other, an unusable
OUTDIR, a broken model directory, no input files at all.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
NPY_MAGIC = b"\x93NUMPY"


class UsageError(Exception):
    """A problem with the command line or its paths, found before any work: one line, exit status 2."""


@dataclass(frozen=True)
class Job:
    """One input file and its outputs' path without suffix (``OUTDIR/<path under the input folder>/<name>``)."""

    source: Path
    out: Path


def output_stem(relative: Path, decode: bool) -> Path:
    """``a/x.wav`` -> ``a/x``; with ``--decode`` ``a/x.codes.npy`` (or ``a/x.npy``) -> ``a/x``."""
    name = relative.name.removesuffix(".npy").removesuffix(".codes") if decode else relative.stem
    return relative.with_name(name)


def plan_jobs(paths: list[Path], suffixes: set[str], outdir: Path, decode: bool
              ) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Files as given, folders expanded (recursively, sorted) to their files with the given suffixes; the
    outputs of a folder's files mirror its tree under ``outdir``. Returns the jobs and ``(path, reason)`` for
    the inputs that cannot be read (missing, or not regular files: a pipe would block the run)."""
    jobs, problems = [], []
    for p in paths:
        if p.is_dir():
            candidates = [(f, f.relative_to(p)) for f in sorted(p.rglob("*"))
                          if f.suffix.lower() in suffixes and not f.is_dir()]
        elif p.exists() or p.is_symlink():
            candidates = [(p, Path(p.name))]
        else:
            problems.append((p, "no such file or folder"))
            continue
        for f, relative in candidates:
            if f.is_file():
                jobs.append(Job(f, outdir / output_stem(relative, decode)))
            else:
                problems.append((f, f"{unreadable_reason(f)}: skipped"))
    return jobs, problems


def unreadable_reason(path: Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read, in words."""
    try:
        path.stat()
    except OSError as e:
        if path.is_symlink():
            return "a symbolic link loop" if e.errno == errno.ELOOP else "a symbolic link to a missing file"
        return e.strerror or str(e)
    return "not a regular file (a pipe, socket or device)"


def output_files(job: Job, args: argparse.Namespace) -> dict[str, Path]:
    """The files a job writes, by kind: ``codes`` (``<name>.codes.npy``) and/or ``wave`` (``<name>.wav``)."""
    codes = {"codes": job.out.with_name(job.out.name + ".codes.npy")}
    wave = {"wave": job.out.with_name(job.out.name + ".wav")}
    return wave if args.decode else codes if args.encode_only else codes | wave


def check_collisions(jobs: list[Job], args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other."""
    inputs: dict[Path, Path] = {}
    for job in jobs:
        key = job.source.resolve()
        if key in inputs:
            raise UsageError(f"{inputs[key]} and {job.source} are the same file ({key}); give it once")
        inputs[key] = job.source
    writer: dict[Path, Path] = {}
    for job in jobs:
        for path in output_files(job, args).values():
            key = path.resolve()
            if key in inputs:
                raise UsageError(f"the output {path} would overwrite the input {inputs[key]}; "
                                 "choose an -o folder outside the inputs")
            if key in writer:
                raise UsageError(f"{writer[key]} and {job.source} would both be written to {path}; "
                                 "rename one of them or process them in separate runs")
            writer[key] = job.source


def check_outdir(outdir: Path) -> None:
    """The output folder exists (created if need be) and takes files, or :class:`UsageError`."""
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as e:
        raise UsageError(f"-o {outdir}: cannot write there ({e.strerror or e})") from None


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array file (never a pickle), or ``ValueError`` naming the file."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ValueError(f"{path} is not a NumPy array file (.npy): it lacks the .npy header")
        f.seek(0)
        try:
            return np.load(f, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a plain numeric .npy array ({e})") from None


def write_atomic(outputs: dict[Path, Callable[[str], None]]) -> None:
    """Each ``write(tmp_path)`` into a temporary file beside its path; once every one is written, each is
    renamed over its path. A failure leaves none of them: the temporary files are removed, and so are
    the outputs of this call already renamed."""
    staged: list[tuple[str, Path]] = []
    renamed: list[Path] = []
    path = None
    try:
        for path, write in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in staged:
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException as e:
        for done in renamed:
            done.unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError):  # soundfile raises RuntimeError subclasses
            raise OSError(f"cannot write {path} ({getattr(e, 'strerror', None) or e})") from None
        raise
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def wav_writer(wav: np.ndarray, sample_rate: int) -> Callable[[str], None]:
    """Encodes float WAV in memory, then writes the bytes with Python, so a full disk reads "No space left on
    device" (libsndfile writing a file says only "System error.")."""
    import soundfile as sf

    def write(tmp: str) -> None:
        encoded = io.BytesIO()
        sf.write(encoded, wav, sample_rate, subtype="FLOAT", format="WAV")
        with open(tmp, "wb") as f:
            f.write(encoded.getbuffer())

    return write


def codes_writer(codes: np.ndarray) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, codes.astype(np.int64))

    return write


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="model directory, release folder or hub repo id (Dongchao/almtokenizer2); a "
                   "release is converted once into the cache (ALMTokenizer2.from_pretrained)")
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
    if not -(2 ** 63) <= args.seed < 2 ** 63:
        p.error(f"--seed {args.seed}: must fit in 64 bits (from -2**63 to 2**63 - 1)")
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

    def fail(self, name: str, error: Exception | str) -> None:
        self.failed.append(name)
        message = str(error)
        self.bar.write(f"error: {message}" if name in message else f"error: {name}: {message}", file=sys.stderr)
        self._step()

    def window(self, stage: str, done: int, total: int) -> None:
        """Progress inside the current files (:data:`~almtok_jax.tokenizer.WindowProgress`)."""
        self.bar.set_postfix_str(f"{stage} {done}/{total}, {self._rate()}")

    def _rate(self) -> str:
        return f"{self.audio_s / max(time.perf_counter() - self.start, 1e-9):.2f} audio s/s"

    def _step(self) -> None:
        self.bar.set_postfix_str(self._rate())
        self.bar.update(1)

    def summary(self) -> str:
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        return (f"{self.done} done, {len(self.failed)} failed, {self.audio_s:.1f} s of audio in {elapsed:.1f} s "
                f"({self.audio_s / max(elapsed, 1e-9):.2f} audio s/s)")


def load_tokenizer(args: argparse.Namespace):
    """``ALMTokenizer2.load``; a broken or mismatched model directory is a :class:`UsageError`."""
    from almtok_jax.tokenizer import ALMTokenizer2

    try:
        tok = ALMTokenizer2.from_pretrained(args.checkpoint, compat=args.compat)
        tok.sampler_config(args.steps, args.guidance, args.solver)  # a bad --solver/--steps: once, before any work
    except ValueError as e:  # ModelDirError and config errors: their message names the file and the problem
        raise UsageError(str(e)) from None
    return tok


def encode_job(tok, job: Job, args: argparse.Namespace, progress: Progress) -> tuple[np.ndarray, int | None, float]:
    """One input's codes ``(Q, T)`` (encoded, or read with ``--decode``), the length to decode them to
    (``None``: what the codes give, as the reference does) and the seconds of audio read (0 for code files)."""
    from almtok_jax.audio import load_audio, to_mono
    from almtok_jax.tokenizer import check_codes

    if args.decode:
        return check_codes(load_npy(job.source), tok.num_codebooks, tok.codebook_size, str(job.source)), None, 0.0
    wav, sr = load_audio(job.source)
    wav24 = tok.to_model_rate(to_mono(wav), sr)
    codes = tok.encode_clips([wav24], progress.window)[0]["codes"]
    return codes, None if args.compat == "release" else len(wav24), len(wav24) / tok.sample_rate


def save_outputs(tok, job: Job, args: argparse.Namespace, codes: np.ndarray, wave: np.ndarray | None,
                 progress: Progress, seconds: float) -> None:
    """Write one input's outputs; a write failure, or audio that is not finite, fails that input only."""
    if wave is not None and not np.all(np.isfinite(wave)):
        progress.fail(str(job.source), f"{job.source}: the decoded audio is not finite (NaN or infinite "
                                       "samples); nothing written")
        return
    try:
        write_atomic({path: codes_writer(codes) if kind == "codes" else wav_writer(wave, tok.sample_rate)
                      for kind, path in output_files(job, args).items()})
    except OSError as e:
        progress.fail(str(job.source), f"{job.source}: {e}")
        return
    progress.ok(seconds)


def decode_batch(tok, batch: list[tuple[Job, np.ndarray, int | None]], args: argparse.Namespace,
                 noise: np.ndarray | None, progress: Progress) -> None:
    """Decode clips together and save them; on failure retry one by one so one bad clip fails alone."""
    try:
        results = tok.decode_clips([c for _, c, _ in batch], args.steps, args.guidance, args.seed,
                                   [noise] * len(batch), [n for _, _, n in batch], args.solver, progress.window)
    except Exception as e:  # one bad clip must not stop the run
        if len(batch) == 1:
            progress.fail(str(batch[0][0].source), e)
        else:
            for item in batch:
                decode_batch(tok, [item], args, noise, progress)
        return
    for (job, codes, _), r in zip(batch, results, strict=True):
        save_outputs(tok, job, args, codes, r["wave"], progress, len(r["wave"]) / tok.sample_rate)


def plan(args: argparse.Namespace) -> tuple[list[Job], list[tuple[Path, str]]]:
    """The jobs and unreadable inputs of the command line, after every check that needs no model."""
    suffixes = {".npy"} if args.decode else AUDIO_SUFFIXES
    jobs, problems = plan_jobs(args.decode or args.inputs, suffixes, args.outdir, bool(args.decode))
    if not jobs and not problems:
        raise UsageError(f"no input files ({', '.join(sorted(suffixes))}) in "
                         f"{', '.join(str(p) for p in args.decode or args.inputs)}")
    if args.noise is not None and len(jobs) + len(problems) != 1:
        raise UsageError("--noise needs exactly one input")
    check_collisions(jobs, args)
    check_outdir(args.outdir)
    return jobs, problems


def run(args: argparse.Namespace) -> int:
    jobs, problems = plan(args)
    tok = load_tokenizer(args) if jobs else None
    try:
        noise = load_npy(args.noise) if args.noise else None
    except (OSError, ValueError) as e:
        raise UsageError(f"--noise {args.noise}: {e}") from None
    progress = Progress(len(jobs) + len(problems))
    for path, reason in problems:
        progress.fail(str(path), reason)
    if jobs:
        pending: list[tuple[Job, np.ndarray, int | None]] = []  # (job, codes, output length) to decode
        for job in jobs:
            try:
                codes, length, seconds = encode_job(tok, job, args, progress)
                if args.encode_only:
                    save_outputs(tok, job, args, codes, None, progress, seconds)
                    continue
            except Exception as e:  # report the file and go on with the others
                progress.fail(str(job.source), e)
                continue
            pending.append((job, codes, length))
            if len(pending) >= args.batch_size:
                decode_batch(tok, pending, args, noise, progress)
                pending = []
        if pending:
            decode_batch(tok, pending, args, noise, progress)
    print(progress.summary())
    return 1 if progress.failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
