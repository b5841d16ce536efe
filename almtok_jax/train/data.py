"""Training input pipeline (grain), spec ``04-sqcodec-training.md`` B.2-B.5.

Sources: the reference's list file (one clip per line, four tab-separated fields ``name, path, duration,
sample rate``; blank lines and ``#`` comments are skipped, any other line that names no clip is reported
as an unreadable clip, never dropped silently) or a folder searched recursively for
wav/flac/ogg files. Per clip, on the host: read a segment of ``segment_seconds`` (a random offset by
default, the file's start with ``crop=start`` like the reference), average the channels, zero-pad,
resample to 24 kHz with the reference resampler, and apply the reference ``VolumeNorm`` (B.4: skip if
``mean(x^2) < 1e-6``, else gain to a BS.1770 loudness of ``-16 + U(-3, 3)`` LUFS, then ``0.95 / peak`` if
the peak exceeds 1). Every random draw comes from grain's per-record RNG (seeded by ``TrainConfig.seed``),
so the stream is a pure function of the seed and the position in it; the position is the step, so the
iterator has no state of its own to checkpoint.

A clip that cannot be read is logged and replaced by the next one in the list: training never stops on a
corrupt file. Batches are dicts of NumPy arrays for this host: ``wav`` ``(B_host, S)`` float32 at 24 kHz and
``length`` ``(B_host,)`` int32 (valid samples before the zero padding).

One global stream for any number of processes (:class:`ProcessRows`): global batch ``b`` is positions
``[b·G, (b+1)·G)`` of the sampler's stream (``G`` = ``global_batch_size``); each process reads only the
rows its devices hold. The global batches, and every clip's random draws (keyed by its position), are
therefore the same on 1 process or N, and a run resumed at step ``k`` restarts the stream at batch ``k``
whatever the number of processes that wrote the checkpoint.

Locations (the source, list entries, audio files) are local paths or URIs (``gs://bucket/...``) read
through ``etils.epath``; relative entries of a list resolve against the list's folder, wherever it is.

Deviations from the reference (deliberate): random crop by default; the actual file header decides the
frames to read (the list's duration/sample-rate columns are parsed but not trusted); the epoch order is
reshuffled every epoch (the reference repeats epoch 0's permutation); the last partial batch is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import grain
import jax
import numpy as np
import pyloudnorm
import soundfile as sf
from etils import epath

from almtok_jax.audio import resample, to_mono
from almtok_jax.train.config import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipEntry:
    """One clip of the data; ``error`` set (and ``path`` = ``LIST:LINE``) for a list line that names none."""

    path: str
    duration: float | None = None
    sample_rate: int | None = None
    error: str | None = None


def _list_entry(line: str, where: str, folder: epath.Path) -> ClipEntry:
    """One list line (4 tab-separated fields) as a clip, or as an entry carrying what is wrong with it."""
    fields = line.split("\t")
    if len(fields) != 4:
        return ClipEntry(where, error=f"{where}: expected 4 tab-separated fields (name, path, duration, sample "
                                      f"rate), got {len(fields)}: {line[:200]!r}")
    _, audio, duration, rate = fields
    audio_path = audio if "://" in audio or os.path.isabs(audio) else str(folder / audio)
    try:
        return ClipEntry(audio_path, float(duration), int(rate))
    except ValueError:
        return ClipEntry(where, error=f"{where}: duration {duration!r} or sample rate {rate!r} is not a number")


def read_list(path: str | os.PathLike) -> list[ClipEntry]:
    """Parse a 4-column tab-separated list; relative audio paths are resolved against the list's folder.
    Blank lines and ``#`` comments are skipped; every other line is an entry, those that name no clip with
    their ``error`` (reported, never dropped silently)."""
    path = epath.Path(path)
    lines = enumerate(path.read_text().splitlines(), start=1)
    return [_list_entry(line, f"{path}:{n}", path.parent) for n, line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def scan_folder(folder: str | os.PathLike, extensions: tuple[str, ...]) -> list[ClipEntry]:
    """Audio files under ``folder`` (recursive), sorted by path."""
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    files = sorted(str(epath.Path(root) / name) for root, _, names in epath.Path(folder).walk()
                   for name in names if name.lower().endswith(suffixes))
    return [ClipEntry(f) for f in files]


def read_source(source: str | os.PathLike,
                extensions: tuple[str, ...] = ("wav", "flac", "ogg")) -> list[ClipEntry]:
    """A list file or an audio folder -> clip entries (error if there are none)."""
    source = epath.Path(source)
    if source.is_dir():
        entries = scan_folder(source, extensions)
    elif source.is_file():
        entries = read_list(source)
    else:
        raise FileNotFoundError(f"training data {source} is neither a list file nor a folder")
    if not entries:
        raise ValueError(f"training data {source}: no usable clips (4-column lists or {extensions} files)")
    return entries


class ClipSource:
    """grain random-access source: record ``i`` is ``(i, entry)``."""

    def __init__(self, entries: list[ClipEntry]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, ClipEntry]:
        return int(index), self.entries[int(index)]

    def __repr__(self) -> str:
        # grain checks a restored iterator state against repr(source): identify the clip list by content.
        digest = hashlib.sha1("\n".join(e.path for e in self.entries).encode()).hexdigest()[:16]
        return f"ClipSource(clips={len(self.entries)}, sha1={digest})"


def read_segment(path: str, seconds: float, crop: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Mono float32 segment of at most ``seconds`` (at the file's rate) and the file's rate."""
    with epath.Path(path).open("rb") as f, sf.SoundFile(f) as audio:
        frames = int(audio.samplerate * seconds)
        if audio.frames > frames and crop == "random":
            audio.seek(int(rng.integers(0, audio.frames - frames + 1)))
        wav = to_mono(audio.read(min(frames, audio.frames), dtype="float32", always_2d=True).T)
        rate = audio.samplerate
    if wav.size == 0:
        raise ValueError(f"{path}: no samples")
    if not np.all(np.isfinite(wav)):
        raise ValueError(f"{path}: the audio holds NaN or infinite samples")
    return wav, rate


def volume_norm(wav: np.ndarray, sample_rate: int, target_lufs: float, threshold: float) -> np.ndarray:
    """Reference ``VolumeNorm`` with a given target (B.4)."""
    if np.mean(wav.astype(np.float64) ** 2) < threshold:
        return wav
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wav.astype(np.float64))
    if np.isfinite(loudness):
        wav = wav * np.float32(10.0 ** ((target_lufs - loudness) / 20.0))
    peak = np.max(np.abs(wav))
    if peak > 1.0:
        wav = wav * np.float32(0.95 / peak)
    return wav.astype(np.float32)


class LoadClip(grain.transforms.RandomMap):
    """``(index, entry)`` -> ``{"wav": (S,), "length": ()}``, replacing unreadable clips by the next ones."""

    def __init__(self, entries: list[ClipEntry], config: DataConfig):
        self.entries = entries
        self.config = config

    def random_map(self, record: tuple[int, ClipEntry], rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, entry = record
        for attempt in range(len(self.entries)):
            if attempt:
                entry = self.entries[(index + attempt) % len(self.entries)]
            try:
                return self.load(entry, rng)
            except Exception as err:  # a corrupt clip must never stop training
                log.warning("skipping unreadable clip %s: %s", entry.path, err)
        raise RuntimeError("no clip of the training data could be read")

    def load(self, entry: ClipEntry, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if entry.error is not None:
            raise ValueError(entry.error)
        c, path = self.config, entry.path
        wav, rate = read_segment(path, c.segment_seconds, c.crop, rng)
        target = c.loudness_target_lufs + rng.uniform(-c.loudness_jitter_lu, c.loudness_jitter_lu)
        valid = min(int(round(wav.size * c.sample_rate / rate)), c.segment_samples)
        frames = int(rate * c.segment_seconds)
        wav = np.pad(wav, (0, frames - wav.size))
        if rate != c.sample_rate:
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                wav = np.asarray(resample(wav, rate, c.sample_rate))
        wav = np.pad(wav[: c.segment_samples], (0, max(0, c.segment_samples - wav.size)))
        if c.normalize_loudness:
            wav = volume_norm(wav, c.sample_rate, target, c.loudness_energy_threshold)
        return {"wav": wav.astype(np.float32), "length": np.int32(valid)}


class ProcessRows:
    """grain sampler: rows ``[start, stop)`` of every global batch of ``base``'s stream, from batch
    ``first_batch`` on. Local index ``i`` is global position ``(first_batch + i // L)·G + start + i % L``
    (``L = stop - start``); the record keeps that position's metadata (record key and RNG)."""

    def __init__(self, base: grain.samplers.IndexSampler, global_batch: int, rows: tuple[int, int],
                 first_batch: int = 0):
        start, stop = rows
        if not 0 <= start < stop <= global_batch:
            raise ValueError(f"rows {rows} are not a block of a global batch of {global_batch}")
        self.base, self.global_batch, self.rows, self.first_batch = base, global_batch, rows, first_batch

    def __len__(self) -> int:
        batches = max(0, len(self.base) // self.global_batch - self.first_batch)
        return batches * (self.rows[1] - self.rows[0])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        batch, row = divmod(index, self.rows[1] - self.rows[0])
        return self.base[(self.first_batch + batch) * self.global_batch + self.rows[0] + row]

    def __repr__(self) -> str:
        return (f"ProcessRows(base={self.base!r}, global_batch={self.global_batch}, rows={self.rows}, "
                f"first_batch={self.first_batch})")


def make_loader(source: str | os.PathLike, config: DataConfig, seed: int, *, shuffle: bool | None = None,
                num_epochs: int | None = None, rows: tuple[int, int] | None = None,
                first_batch: int = 0) -> grain.DataLoader:
    """grain ``DataLoader`` yielding this process's rows of each global batch, from global batch
    ``first_batch`` on (a run resumed at step ``k``: ``first_batch=k``).

    ``rows``: the ``[start, stop)`` rows of a global batch that this process's devices hold
    (:func:`almtok_jax.train.sharding.process_rows`); default: block ``process_index`` of
    ``process_count`` equal blocks. ``num_epochs=None`` repeats forever; the last partial global batch of a
    finite stream is dropped.
    """
    entries = read_source(source, config.extensions)
    size, hosts = config.global_batch_size, jax.process_count()
    if size % hosts:
        raise ValueError(f"global_batch_size={size} not divisible by {hosts} processes")
    if rows is None:
        rows = (jax.process_index() * size // hosts, (jax.process_index() + 1) * size // hosts)
    sampler = grain.samplers.IndexSampler(
        num_records=len(entries), shuffle=config.shuffle if shuffle is None else shuffle,
        num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(
        data_source=ClipSource(entries), sampler=ProcessRows(sampler, size, rows, first_batch),
        operations=[LoadClip(entries, config), grain.transforms.Batch(rows[1] - rows[0], drop_remainder=True)],
        worker_count=config.worker_count, worker_buffer_size=config.worker_buffer_size,
        shard_options=grain.sharding.NoSharding())


def dataset_size(source: str | os.PathLike, config: DataConfig) -> int:
    """Clips in ``source``, after checking that at least one of them exists (a list naming only missing
    files would otherwise fail only once the first batch is read, after the whole set-up)."""
    entries = read_source(source, config.extensions)
    if not any(e.error is None and epath.Path(e.path).exists() for e in entries):
        first = entries[0].error or f"{entries[0].path}: no such file"
        raise FileNotFoundError(f"training data {source}: none of its {len(entries)} clips exists ({first})")
    return len(entries)
