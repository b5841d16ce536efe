"""Audio front end: file reading, the reference resampler and the Whisper log-mel spectrogram.

* :func:`load_audio` / :func:`to_mono` / :func:`load_mono` read wav/flac/ogg through soundfile as float32
  in [-1, 1] (integer PCM scaled by ``1/2**(bits-1)``, like ``torchaudio.load``).
* :func:`resample` is torchaudio's ``sinc_interp_hann`` resampler (lowpass width 6, rolloff 0.99) as a
  polyphase strided convolution; :class:`Resampler` holds its kernel as a ``buffers`` variable so the
  checkpoint's ``wavlm_transfer.kernel`` can be loaded into it (:func:`resampler_rules`).
* :func:`whisper_log_mel` is ``WhisperFeatureExtractor`` (80 Slaney mels, 30 s window), channels-last.

Everything numeric is jit-able and batched over leading axes; the sample rates are static.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from almtok_jax.mapping import Rule

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


SAMPLE_RATE = 24000  # Hz: the waveform rate of the codec (its input and output audio, as released)


class AudioError(ValueError):
    """An audio file or waveform that cannot be used (unreadable, empty, non-finite, wrong length)."""


# ----------------------------------------------------------------------------------------------- files


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file: ``(wav float32 (channels, N), sample_rate)``.

    Integer PCM is scaled to [-1, 1) (int16 by ``1/2**15``); float files are returned as stored. Raises
    :class:`AudioError` naming the file if it cannot be decoded, holds no samples, or has NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():  # libsndfile says "System error." for a missing file and blocks on a pipe
        raise AudioError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        check_sample_rate(sf.info(str(path)).samplerate, f"{path}: ")  # before reading: rates drive sizes
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: cannot read audio ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples (zero-length audio)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    return np.ascontiguousarray(data.T), int(sample_rate)


def to_mono(wav: np.ndarray) -> np.ndarray:
    """Average the channels of ``(channels, N)`` audio -> ``(N,)``; a 1-D input is returned as is."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise AudioError(f"expected audio of shape (channels, N) or (N,), got {wav.shape}")
    return wav.mean(axis=0, dtype=np.float32)


def load_mono(path: str | Path, sample_rate: int = 24000) -> np.ndarray:
    """Read a file, average its channels and resample it to ``sample_rate``: float32 ``(N,)``."""
    wav, file_rate = load_audio(path)
    mono = to_mono(wav)
    if file_rate == sample_rate:
        return mono
    return np.asarray(resample(jnp.asarray(mono), file_rate, sample_rate))


# ------------------------------------------------------------------------------------------ resampling

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000  # beyond: a broken header, not audio
MAX_KERNEL_VALUES = 1 << 22  # a resampling kernel holds at most this many values (32 MiB in float64)


@dataclass(frozen=True)
class ResamplePlan:
    """Rates reduced by their gcd and the one-sided kernel half-width ``width`` (in input samples)."""

    orig: int
    new: int
    width: int
    lowpass_filter_width: int
    rolloff: float

    @property
    def taps(self) -> int:
        return 2 * self.width + self.orig


def resample_plan(orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
                  rolloff: float = 0.99) -> ResamplePlan:
    """torchaudio's reduction: ``orig, new = rates / gcd`` and the kernel half-width in input samples,
    ``width = ceil(lpw * orig / (min(orig, new) * rolloff))``.

    Where that kernel (``new x (2 width + orig)`` values) would exceed :data:`MAX_KERNEL_VALUES` (rates
    with a small gcd: 44101 -> 24000 would need 24000 x 44125), the ratio ``new / orig`` is replaced by
    the nearest fraction with a small enough denominator: the output rate is then off by at most 1.3e-4
    relative (8001 -> 24000 runs as 1 -> 3; 0.2 cent of pitch, far below hearing; measured over 3000 random
    rates to 24k and 16k). Every rate pair of the reference (16k, 22.05k, 44.1k, 48k -> 24k; 24k -> 16k)
    and every pair whose exact kernel fits stays exact.
    """
    check_sample_rate(orig_sr)
    check_sample_rate(new_sr)
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    for limit in (orig, *(1 << k for k in range(12, 2, -1))):  # the exact ratio first
        ratio = Fraction(new, orig).limit_denominator(limit)
        plan = _plan(ratio.denominator, ratio.numerator, lowpass_filter_width, rolloff)
        if plan.new * plan.taps <= MAX_KERNEL_VALUES:
            return plan
    return plan  # 8 as denominator: reached only by ratios beyond the sample-rate bounds


def _plan(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> ResamplePlan:
    width = math.ceil(lowpass_filter_width * orig / (min(orig, new) * rolloff))
    return ResamplePlan(orig, new, width, lowpass_filter_width, rolloff)


def check_sample_rate(rate: int, where: str = "") -> None:
    """Refuse a sample rate that is not an integer within [:data:`MIN_SAMPLE_RATE`, :data:`MAX_SAMPLE_RATE`]."""
    if int(rate) != rate or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{where}sample rate {rate} Hz is not supported (an integer from {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE} Hz)")


def sinc_resample_kernel(orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> np.ndarray:
    """Hann-windowed sinc kernel, torchaudio layout ``(new, 1, 2*width + orig)`` (rates reduced), float32.

    ``K[c, j] = sinc(t) * cos(pi t / (2 lpw))^2 * base / orig`` with ``t = clamp(((j - width)/orig - c/new)
    * base, -lpw, lpw)`` and ``base = min(orig, new) * rolloff``; computed in float64 (like the
    ``Resample`` module), then cast.
    """
    p = resample_plan(orig_sr, new_sr, lowpass_filter_width, rolloff)
    base = min(p.orig, p.new) * rolloff
    idx = np.arange(-p.width, p.width + p.orig, dtype=np.float64)[None, :] / p.orig
    t = (np.arange(0, -p.new, -1, dtype=np.float64)[:, None] / p.new + idx) * base
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    kernel = np.sinc(t) * window * (base / p.orig)
    return kernel[:, None, :].astype(np.float32)


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """torchaudio's output length ``ceil(new * L / orig)`` (reduced rates), with the ceil taken in float32.

    The float32 rounding makes some long 44.1k/22.05k -> 24k outputs one sample shorter than the exact ceil.
    """
    p = resample_plan(orig_sr, new_sr)
    return int(np.ceil(np.float32(p.new * length / p.orig)))


@partial(jax.jit, static_argnames=("orig_sr", "new_sr", "lowpass_filter_width", "rolloff"))
def resample(wav: Array, orig_sr: int, new_sr: int, kernel: Array | None = None,
             lowpass_filter_width: int = 6, rolloff: float = 0.99) -> Array:
    """Resample along the last axis: ``(..., N) at orig_sr -> (..., N_out) at new_sr`` (float32).

    Zero-pads ``width`` samples left and ``width + orig`` right, cuts frames of ``2*width + orig`` taps
    with hop ``orig`` and emits ``new`` interleaved outputs per frame (one per kernel row), then
    truncates to :func:`resampled_length`. ``kernel`` (torchaudio layout ``(new, 1, taps)``, e.g. the
    checkpoint's ``wavlm_transfer.kernel``) defaults to :func:`sinc_resample_kernel`.
    """
    if orig_sr == new_sr:
        return wav
    p = resample_plan(orig_sr, new_sr, lowpass_filter_width, rolloff)
    if kernel is None:
        kernel = sinc_resample_kernel(orig_sr, new_sr, lowpass_filter_width, rolloff)
    if tuple(kernel.shape) != (p.new, 1, p.taps):
        raise ValueError(f"resample kernel for {orig_sr}->{new_sr} must be {(p.new, 1, p.taps)}, "
                         f"got {tuple(kernel.shape)}")
    lead, length = wav.shape[:-1], wav.shape[-1]
    if length == 0:
        raise AudioError("cannot resample an empty waveform")
    x = wav.reshape(-1, length, 1).astype(jnp.float32)
    x = jnp.pad(x, ((0, 0), (p.width, p.width + p.orig), (0, 0)))
    taps_io = jnp.transpose(jnp.asarray(kernel, jnp.float32), (2, 1, 0))  # (taps, 1, new)
    y = jax.lax.conv_general_dilated(x, taps_io, window_strides=(p.orig,), padding="VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"), precision=HIGHEST)
    n_out = resampled_length(length, orig_sr, new_sr)
    y = y.reshape(y.shape[0], -1)[:, :n_out]
    return y.reshape(*lead, n_out)


class Resampler(nn.Module):
    """:func:`resample` with its kernel held as the ``buffers/kernel`` variable (``Resample.kernel``)."""

    orig_sr: int = 24000
    new_sr: int = 16000

    @nn.compact
    def __call__(self, wav: Array) -> Array:
        kernel = self.variable("buffers", "kernel",
                               lambda: jnp.asarray(sinc_resample_kernel(self.orig_sr, self.new_sr)))
        return resample(wav, self.orig_sr, self.new_sr, kernel.value)


def resampler_rules() -> list[Rule]:
    """torchaudio ``Resample`` state dict (just ``kernel``) -> :class:`Resampler` variables."""
    return [Rule(r"kernel", "buffers/kernel")]


# ---------------------------------------------------------------------------------------- Whisper mel


@dataclass(frozen=True)
class LogMelConfig:
    """``WhisperFeatureExtractor`` settings (whisper-medium preprocessor config = the defaults)."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    chunk_length: int = 30

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sample_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length


def hann_window(n: int, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi k / n)`` of length ``n``, evaluated in ``dtype``.

    float32 (the default) is ``torch.hann_window``; a float64 evaluation differs from it by up to 2.4e-7.
    """
    real = np.dtype(dtype).type
    k = np.arange(n, dtype=real)
    return real(0.5) - real(0.5) * np.cos(k * real(2 * np.pi / n))


def hz_to_mel(f: np.ndarray, scale: str = "slaney") -> np.ndarray:
    """Hz -> mel, float64: ``"slaney"`` (linear below 1 kHz, log above, librosa's default) or ``"htk"``."""
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, log_part)


def mel_to_hz(m: np.ndarray, scale: str = "slaney") -> np.ndarray:
    """The inverse of :func:`hz_to_mel`, float64."""
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)))


def mel_filters(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 80, f_min: float = 0.0,
                f_max: float | None = None, scale: str = "slaney", norm: str | None = "slaney") -> np.ndarray:
    """Triangular mel filter bank ``(n_fft//2 + 1, n_mels)``, computed in float64, returned as float32.

    ``n_mels`` triangles with corners equally spaced on the ``scale`` mel axis from ``f_min`` to ``f_max``
    (default ``sample_rate / 2``); ``norm="slaney"`` scales each to unit area (``2 / width``), ``None``
    keeps peak 1. The defaults equal ``librosa.filters.mel(sr, n_fft, n_mels)`` transposed (Whisper);
    ``scale="htk", norm=None`` is torchaudio's ``melscale_fbanks`` (MusicFM).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mels = np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale), n_mels + 2)
    edges = mel_to_hz(mels, scale)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":
        bank *= 2.0 / (edges[2:] - edges[:-2])
    elif norm is not None:
        raise ValueError(f"unknown mel filter norm {norm!r} (use 'slaney' or None)")
    return bank.astype(np.float32)


@partial(jax.jit, static_argnames=("config",))
def _log_mel(wav: Array, config: LogMelConfig) -> Array:
    n, hop, n_fft = config.n_samples, config.hop_length, config.n_fft
    length = wav.shape[-1]
    x = wav[:, :n] if length > n else jnp.pad(wav, ((0, 0), (0, n - length)))
    x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    # Frames of the centred STFT, the last one (index n/hop) dropped like the reference.
    starts = np.arange(config.n_frames) * hop
    frames = x[:, starts[:, None] + np.arange(n_fft)[None, :]] * hann_window(n_fft)
    spectrum = jnp.fft.rfft(frames, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    mel = jnp.einsum("btf,fm->btm", power, mel_filters(config.sample_rate, n_fft, config.n_mels),
                     precision=HIGHEST)
    log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
    peak = jnp.max(log_mel, axis=(1, 2), keepdims=True)
    return (jnp.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def whisper_log_mel(wav16k: Array, config: LogMelConfig = LogMelConfig(), crop: bool = False) -> Array:
    """Whisper log-mel of 16 kHz audio: ``(B, L) or (L,) -> (B, n_frames, n_mels) = (B, 3000, 80)``.

    Channels-last (frames at 100 Hz, mel bins last).
    Each example is zero-padded to 30 s (``config.n_samples``); a longer input raises :class:`AudioError`
    unless ``crop=True`` (the reference's silent truncation). Centred reflect-padded STFT (periodic Hann,
    n_fft 400, hop 160, last frame dropped), power, Slaney mel, ``log10(max(., 1e-10))``, per-example
    clamp to ``max - 8``, then ``(x + 4) / 4``.
    """
    wav16k = jnp.asarray(wav16k, jnp.float32)
    if wav16k.ndim == 1:
        wav16k = wav16k[None]
    if wav16k.ndim != 2:
        raise AudioError(f"whisper_log_mel expects (B, L) or (L,) 16 kHz audio, got shape {wav16k.shape}")
    length = wav16k.shape[-1]
    if length == 0:
        raise AudioError("whisper_log_mel got an empty waveform")
    if length > config.n_samples and not crop:
        raise AudioError(
            f"segment of {length} samples ({length / config.sample_rate:.2f} s at {config.sample_rate} Hz) "
            f"is longer than Whisper's {config.chunk_length} s window ({config.n_samples} samples); "
            "split it, or pass crop=True to drop the excess like the reference")
    return _log_mel(wav16k, config)
