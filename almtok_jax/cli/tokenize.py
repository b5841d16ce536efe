"""Tokenize a corpus: audio files -> ArrayRecord shards of codes for audio-LM training.

    python -m almtok_jax.cli.tokenize --checkpoint DIR --data LIST_OR_FOLDER --out DIR
                                  [--shard-size 256] [--batch-segments B] [--compat default|release]
                                  [--channels mix|separate] [--workers 8] [--min-seconds 0] [--strict]

Inputs are those of training (:func:`almtok_jax.train.data.read_source`): the 4-column list or a folder of
wav/flac/ogg files, any sample rate; stereo is mixed to mono (``--channels mix``) or encoded per channel.

Work flow on each process: grain threads read, mix and resample the files to 24 kHz; the main thread cuts
them into 12 s segments (:func:`almtok_jax.pipeline.segment_audio`) and packs the segments of many files into
fixed ``(B, S)`` batches (one compilation), encoded data-parallel over the local devices (``jax.jit`` with the
batch split over a one-axis mesh). The next batch is dispatched before the codes of the previous one are
fetched, so the devices never wait for the host. ``B`` defaults to 8 segments per local device.

Output layout (``--out``): shard ``k`` holds the files of list positions ``[k * shard_size, (k + 1) *
shard_size)``, whatever the number of processes, so runs on 1 or N hosts write the same files:

* ``shard-KKKKK-of-NNNNN.array_record``: one record per encoded file, :func:`~almtok_jax.records.encode_record`
  bytes (JSON header + raw little-endian codes ``(Q, T)``, or ``(C, Q, T)`` per channel; int16 when the
  codebook fits);
* ``shard-KKKKK-of-NNNNN.json``: the shard's index entries, failures and run settings, written last: a shard
  is complete when it exists (both files are written under a temporary name, then renamed);
* ``index.jsonl`` (one line per encoded file) and ``summary.json`` (files, hours, frames, tokens, failures,
  codec settings, bitrate), written by process 0 once every process is done.

Many hosts: every process runs the same command with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` set; process ``p`` of ``P`` encodes the shards ``k`` with ``k % P == p`` and writes only
those. ``--out`` must be a folder every process sees. A rerun skips the complete shards (size and record
count as their ``.json`` says) and redoes the others, so an interrupted run (even ``kill -9``) followed by a
rerun writes the bytes of an uninterrupted one; shards of another model (:func:`model_identity`), file list
or setting are refused.
Unreadable, empty, non-finite or too-short files are listed as failures with the reason; the exit status is
non-zero for them only with ``--strict``.

The record format and the readers (:func:`~almtok_jax.records.open_records`,
:func:`~almtok_jax.records.codes_dataset`) are :mod:`almtok_jax.records`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from almtok_jax.audio import AudioError, load_audio, to_mono
from almtok_jax.config import to_dict
from almtok_jax.model import encode_segments
from almtok_jax.pipeline import num_segments, num_tokens, segment_audio
from almtok_jax.records import SHARD_SUFFIX, code_dtype, encode_record
from almtok_jax.tokenizer import TOKEN_OFFSET, ALMTokenizer2
from almtok_jax.train.data import ClipEntry, read_source
from almtok_jax.train.sharding import maybe_initialize_distributed
from almtok_jax.weights.model_dir import ModelDirError

DEFAULT_SEGMENTS_PER_DEVICE = 8


# ------------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shard:
    """Files ``[start, stop)`` of the list."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


def plan_shards(num_files: int, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    count = -(-num_files // shard_size)
    return [Shard(k, count, k * shard_size, min((k + 1) * shard_size, num_files)) for k in range(count)]


def process_shards(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """The shards process ``process_index`` encodes: every ``process_count``-th, by shard index."""
    return [s for s in shards if s.index % process_count == process_index]


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to ``.<name>.tmp`` beside ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_array_record(path: Path, records: Sequence[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    def write(tmp: Path) -> None:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()

    _write_atomic(path, write)


def _write_json(path: Path, value) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n"))


def _record_count(path: Path) -> int | None:
    """Records in an ArrayRecord file, or None when it cannot be opened (cut short, damaged)."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
        try:
            return reader.num_records()
        finally:
            reader.close()
    except Exception:  # noqa: BLE001 - any failure to open means the shard must be written again
        return None


def shard_is_complete(out: Path, shard: Shard, settings: dict) -> bool:
    """Whether ``shard`` is complete and was written by a run with the same ``settings`` (a different
    run is an error). A shard whose ``.json`` cannot be read, or whose data file has not the size and
    record count its ``.json`` records, is incomplete (written again)."""
    meta, data = out / f"{shard.name}.json", out / f"{shard.name}{SHARD_SUFFIX}"
    if not (meta.is_file() and data.is_file()):
        return False
    try:
        written = json.loads(meta.read_text())
        written_settings, index = written["settings"], written["index"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False
    if written_settings != settings:
        changed = sorted(k for k in {**settings, **written_settings}
                         if written_settings.get(k) != settings.get(k))
        what = "another model" if changed == ["model"] else f"other settings ({', '.join(changed)})"
        raise TokenizeError(f"{meta} was written by {what}; use a new --out folder or the same inputs")
    if written.get("bytes", data.stat().st_size) != data.stat().st_size:
        return False
    return _record_count(data) == len(index)


# ------------------------------------------------------------------------------------------ host loading


@dataclass
class LoadedFile:
    """One file at 24 kHz: ``clips`` (one mono clip, or one per channel), or the reason it failed.
    Once its segments are queued the clips are dropped and only their ``lengths`` kept."""

    index: int
    path: str
    duration: float = 0.0
    sample_rate: int = 0
    clips: list[np.ndarray] = field(default_factory=list)
    error: str | None = None
    lengths: list[int] = field(default_factory=list)


class LoadFile:
    """``(index, entry)`` -> :class:`LoadedFile`, run on grain's host threads; never raises."""

    def __init__(self, tok: ALMTokenizer2, channels: str, min_seconds: float):
        self.tok, self.channels, self.min_seconds = tok, channels, min_seconds
        self.cpu = jax.local_devices(backend="cpu")[0]

    def __call__(self, item: tuple[int, ClipEntry]) -> LoadedFile:
        index, entry = item
        try:
            if entry.error is not None:
                raise ValueError(entry.error)
            wav, rate = load_audio(entry.path)
            duration = wav.shape[-1] / rate
            if duration < self.min_seconds:
                raise AudioError(f"{entry.path}: {duration:.3f} s is shorter than --min-seconds {self.min_seconds}")
            clips = [to_mono(wav)] if self.channels == "mix" else list(wav)
            with jax.default_device(self.cpu):
                clips = [self.tok.to_model_rate(c, rate) for c in clips]
            return LoadedFile(index, entry.path, duration, rate, clips)
        except Exception as e:  # any unreadable file becomes a failure, the run goes on
            message = str(e) if entry.path in str(e) else f"{entry.path}: {e}"
            return LoadedFile(index, entry.path, error=f"{type(e).__name__}: {message}")


def load_stream(tok: ALMTokenizer2, work: Sequence[tuple[int, ClipEntry]], channels: str, min_seconds: float,
                workers: int) -> Iterator[LoadedFile]:
    """The files of ``work`` in order, read ahead by ``workers`` grain threads."""
    dataset = grain.MapDataset.source(list(work)).map(LoadFile(tok, channels, min_seconds))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)))


# ------------------------------------------------------------------------------------------------ encode


@functools.cache
def sharded_encode_codes(config, compat: str, mesh: Mesh):
    """Jitted ``(variables, segments (B, S))`` -> codes ``(B, T/2, Q)`` int32, ``B`` split over the mesh's
    ``data`` axis and the variables replicated (one compilation per batch shape)."""

    rows, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda v, s: encode_segments(v, s, config, compat)["codes"],
                   in_shardings=(replicated, rows), out_shardings=rows)


def make_encoder(tok: ALMTokenizer2, mesh: Mesh):
    """``(B, S)`` float32 segments (host) -> codes ``(B, T/2, Q)`` (device, asynchronous); the variables
    are placed on the mesh once."""
    fn = sharded_encode_codes(tok.config, tok.compat, mesh)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    variables = jax.device_put(tok.variables, NamedSharding(mesh, PartitionSpec()))
    return lambda segments: fn(variables, jax.device_put(segments, rows))


class SegmentPacker:
    """Packs segments into fixed ``(batch, S)`` batches and keeps one batch in flight on the devices.

    ``add`` takes a segment and a key; ``drain`` pads and encodes what is left and returns
    ``{key: codes (T/2, Q)}`` for every segment added since the last drain.
    """

    def __init__(self, encode, batch: int, segment_samples: int):
        self.encode, self.batch, self.segment_samples = encode, batch, segment_samples
        self.rows: list[np.ndarray] = []
        self.keys: list = []
        self.in_flight = None
        self.done: dict = {}

    def add(self, segment: np.ndarray, key) -> None:
        self.rows.append(segment)
        self.keys.append(key)
        if len(self.rows) == self.batch:
            self._dispatch()

    def _dispatch(self) -> None:
        pad = self.batch - len(self.rows)
        batch = np.stack(self.rows + [np.zeros(self.segment_samples, np.float32)] * pad)
        codes = self.encode(batch)  # asynchronous: returns before the devices finish
        self._collect()
        self.in_flight, self.rows, self.keys = (codes, self.keys), [], []

    def _collect(self) -> None:
        if self.in_flight is not None:
            codes, keys = self.in_flight
            codes = np.asarray(codes)
            self.done.update({k: codes[i] for i, k in enumerate(keys)})
            self.in_flight = None

    def drain(self) -> dict:
        if self.rows:
            self._dispatch()
        self._collect()
        done, self.done = self.done, {}
        return done


def file_codes(loaded: LoadedFile, done: dict, tok: ALMTokenizer2, channels: str, dtype: str) -> np.ndarray:
    """Gather a file's segment codes: ``(Q, T)``, or ``(C, Q, T)`` with ``channels="separate"``."""
    per_clip = []
    for c, length in enumerate(loaded.lengths):
        rows = [done[(loaded.index, c, s)] for s in range(num_segments(length, tok.pipeline, tok.compat))]
        n_tok = num_tokens(length, tok.pipeline, tok.compat)
        per_clip.append(np.concatenate(rows).reshape(-1, tok.num_codebooks)[:n_tok].T)
    codes = per_clip[0] if channels == "mix" else np.stack(per_clip)
    return codes.astype(dtype)


# --------------------------------------------------------------------------------------------- the run


class Progress:
    """tqdm bar over this process's files: audio hours done and audio seconds per second."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="file", file=sys.stderr, dynamic_ncols=True,
                        disable=not enabled)
        self.start, self.audio_s = time.perf_counter(), 0.0

    def update(self, files: int, seconds: float) -> None:
        self.audio_s += seconds
        self.bar.set_postfix_str(self._rate())
        self.bar.update(files)

    def window(self, stage: str, done: int, total: int) -> None:
        """Progress inside the current file (:data:`~almtok_jax.tokenizer.WindowProgress`)."""
        self.bar.set_postfix_str(f"{stage} {done}/{total}, {self._rate()}")

    def _rate(self) -> str:
        rate = self.audio_s / max(time.perf_counter() - self.start, 1e-9)
        return f"{self.audio_s / 3600:.3f} h, {rate:.2f} audio s/s"

    def close(self) -> tuple[float, float]:
        self.bar.close()
        return self.audio_s, time.perf_counter() - self.start


def encode_shards(tok: ALMTokenizer2, entries: Sequence[ClipEntry], shards: Sequence[Shard], out: Path,
                  settings: dict, batch: int, workers: int, progress: Progress) -> None:
    """Encode and write ``shards`` (in order), each shard's segments packed into batches of ``batch``."""
    channels, dtype = settings["channels"], code_dtype(tok.codebook_size)
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    if batch % mesh.size:
        raise ValueError(f"--batch-segments {batch} is not a multiple of the {mesh.size} local devices")
    length = tok.pipeline.segment_samples + tok.pipeline.segment_extra_samples
    packer = SegmentPacker(make_encoder(tok, mesh), batch, length)
    work = [(i, entries[i]) for s in shards for i in range(s.start, s.stop)]
    stream = load_stream(tok, work, channels, settings["min_seconds"], workers)
    for shard in shards:
        loaded = []
        for _ in range(shard.stop - shard.start):
            f = next(stream)
            segments = [segment_audio(clip, tok.pipeline, tok.compat) for clip in f.clips]
            total = sum(len(s) for s in segments)
            for c, clip_segments in enumerate(segments):
                for s, segment in enumerate(clip_segments):
                    packer.add(segment, (f.index, c, s))  # encodes a batch whenever one is full
                    if total > 1:  # a long file: show its segments go by
                        progress.window("encoding segment", c * len(clip_segments) + s + 1, total)
            f.lengths, f.clips = [len(c) for c in f.clips], []
            loaded.append(f)
            progress.update(1, f.duration)
        done = packer.drain()
        records, index, failures = [], [], []
        for f in loaded:
            if f.error is not None:
                failures.append({"index": f.index, "path": f.path, "reason": f.error})
                continue
            codes = file_codes(f, done, tok, channels, dtype)
            meta = {"index": f.index, "path": f.path, "duration": f.duration, "sample_rate": f.sample_rate,
                    "num_tokens": int(codes.shape[-1])}
            index.append({**meta, "shard": shard.name, "record": len(records), "shape": list(codes.shape)})
            records.append(encode_record(codes, meta))
        data = out / f"{shard.name}{SHARD_SUFFIX}"
        _write_array_record(data, records)
        _write_json(out / f"{shard.name}.json", {"settings": settings, "files": [shard.start, shard.stop],
                                                 "index": index, "failures": failures,
                                                 "bytes": data.stat().st_size})


def summarize(out: Path, shards: Sequence[Shard], tok: ALMTokenizer2, settings: dict) -> tuple[dict, list[dict]]:
    """The run's summary and index entries from every shard's ``.json``: counts, hours, frames, tokens,
    failures, codec settings."""

    metas = [json.loads((out / f"{s.name}.json").read_text()) for s in shards]
    index = [e for m in metas for e in m["index"]]
    failures = [f for m in metas for f in m["failures"]]
    frames = sum(e["num_tokens"] * (e["shape"][0] if len(e["shape"]) == 3 else 1) for e in index)
    return {
        "files": sum(s.stop - s.start for s in shards), "encoded": len(index), "failed": len(failures),
        "hours": sum(e["duration"] for e in index) / 3600, "frames": frames, "tokens": frames * tok.num_codebooks,
        "shards": len(shards), "failures": failures,
        "codec": {**settings, "sample_rate": tok.sample_rate, "frame_rate": tok.frame_rate,
                  "num_codebooks": tok.num_codebooks, "codebook_size": tok.codebook_size,
                  "code_dtype": code_dtype(tok.codebook_size), "token_offset": TOKEN_OFFSET,
                  "vocab_size": tok.vocab_size},
        "bitrate": tok.bitrate,
    }, index


def model_identity(tok: ALMTokenizer2) -> str:
    """SHA-256 of the model's config and of every variable's path, dtype, shape and bytes: the same for a
    copy of a model wherever it lies, different for any other model."""
    digest = hashlib.sha256(json.dumps(to_dict(tok.config), sort_keys=True).encode())
    leaves = sorted(jax.tree_util.tree_flatten_with_path(tok.variables)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))
    for path, leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype.str} {array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def run_settings(args: argparse.Namespace, entries: Sequence[ClipEntry], model: str) -> dict:
    """What the shards' contents depend on (``model``: :func:`model_identity`); a rerun must match them to
    reuse shards."""
    files = hashlib.sha1("\n".join(e.path for e in entries).encode()).hexdigest()
    return {"model": model, "compat": args.compat, "channels": args.channels,
            "shard_size": args.shard_size, "min_seconds": args.min_seconds, "files_sha1": files}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="model directory, release folder or hub repo id (Dongchao/almtokenizer2); a "
                   "release is converted once into the cache (ALMTokenizer2.from_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="4-column list file or folder of audio files")
    p.add_argument("--out", required=True, type=Path, help="output folder (shared by every process)")
    p.add_argument("--shard-size", type=int, default=256, help="files per shard (default 256)")
    p.add_argument("--batch-segments", type=int, default=None,
                   help=f"12 s segments per encode batch on this process, a multiple of the local devices "
                        f"(default {DEFAULT_SEGMENTS_PER_DEVICE} per device)")
    p.add_argument("--compat", choices=("default", "release"), default="default",
                   help="'release' reproduces the reference's segmentation and token count exactly")
    p.add_argument("--channels", choices=("mix", "separate"), default="mix",
                   help="mix the channels to mono (default) or encode each channel")
    p.add_argument("--workers", type=int, default=8, help="host threads reading and resampling audio")
    p.add_argument("--min-seconds", type=float, default=0.0, help="shorter files are failures (default 0)")
    p.add_argument("--extensions", nargs="+", default=["wav", "flac", "ogg"], help="audio suffixes in folders")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any file failed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class TokenizeError(ValueError):
    """A run that cannot go on (reported on one line)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.shard_size < 1:
            raise TokenizeError(f"--shard-size {args.shard_size}: must be at least 1")
        maybe_initialize_distributed()
        entries = read_source(args.data, tuple(args.extensions))
        tok = ALMTokenizer2.from_pretrained(args.checkpoint, compat=args.compat)
        settings = run_settings(args, entries, model_identity(tok))
        shards = plan_shards(len(entries), args.shard_size)
        args.out.mkdir(parents=True, exist_ok=True)
        mine = process_shards(shards, jax.process_index(), jax.process_count())
        todo = [s for s in mine if not shard_is_complete(args.out, s, settings)]
    except (TokenizeError, ModelDirError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = args.batch_segments or DEFAULT_SEGMENTS_PER_DEVICE * jax.local_device_count()
    progress = Progress(sum(s.stop - s.start for s in mine), sum(s.stop - s.start for s in mine if s not in todo),
                        enabled=not args.quiet)
    if todo:
        encode_shards(tok, entries, todo, args.out, settings, batch, args.workers, progress)
    audio_s, elapsed = progress.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("almtok_jax.cli.tokenize: all shards written")
    summary, index = summarize(args.out, shards, tok, settings)
    if jax.process_index() == 0:
        _write_atomic(args.out / "index.jsonl",
                      lambda tmp: tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in index)))
        _write_json(args.out / "summary.json", summary)
    print(f"process {jax.process_index()}/{jax.process_count()}: {len(todo)} of {len(mine)} shards encoded, "
          f"{audio_s / 3600:.3f} h of audio in {elapsed:.1f} s ({audio_s / max(elapsed, 1e-9):.2f} audio s/s); "
          f"all: {summary['encoded']} files, {summary['hours']:.3f} h, {summary['tokens']} tokens, "
          f"{summary['failed']} failed", file=sys.stderr)
    for f in summary["failures"]:
        print(f"failed: {f['reason']}", file=sys.stderr)
    return 1 if args.strict and summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
