"""Reconstruction-quality metrics, computed the way the reference's evaluation toolkit does (spec 04 part C).

Every metric compares a *reference* (original) with a *degraded* (reconstructed) waveform at 16 kHz:
:func:`prepare_pair` averages channels, resamples both to 16 kHz (:func:`almtok_jax.audio.resample`, the
torchaudio sinc resampler; the reference toolkit used ``librosa.resample`` after a ``librosa.load`` at
22,050 Hz) and trims them to the shorter length. The individual metrics then take two equal-length 1-D
16 kHz arrays:

* :func:`pesq_score`: ITU-T P.862 (``mode="nb"``, max ≈ 4.55) / P.862.2 (``mode="wb"``, max ≈ 4.64),
  ludlows ``pesq`` package. The README's "PESQ" is one of the two (unknown which): report both, labelled.
* :func:`stoi_score`: classic (not extended) STOI, ``pystoi`` (which resamples to 10 kHz internally).
* :func:`mrstft_loss`: the "MS-STFT loss" of the README: ParallelWaveGAN's multi-resolution STFT loss,
  (n_fft, hop, win) = (1024, 120, 600), (2048, 240, 1200), (512, 50, 240), periodic Hann window of length
  ``win`` centred in ``n_fft``, centred frames with reflect padding, magnitude ``sqrt(max(|X|², 1e-7))``;
  per resolution spectral convergence ``‖M_ref − M_deg‖_F / ‖M_ref‖_F`` and log-magnitude
  ``mean|ln M_ref − ln M_deg|``, each averaged over the resolutions, then summed. Lower is better.
* :func:`mel_distance`: a multi-scale log-mel L1 distance (our own definition, not in the reference):
  for (n_fft, n_mels) in (64, 5), (128, 10), (256, 20), (512, 40), (1024, 80), (2048, 160), a periodic
  Hann window of length n_fft, hop n_fft/4, centred reflect-padded frames, magnitude spectrum through a
  Slaney mel filterbank (0–8 kHz), distance ``mean|log10 max(mel_ref, 1e-5) − log10 max(mel_deg, 1e-5)|``;
  mean over the scales. Lower is better; a gain of g gives |log10 g|.
* :func:`si_sdr`: scale-invariant SDR in dB (both signals made zero-mean), with an ``eps`` in both energy
  terms so identical signals give a large finite value (> 100 dB) instead of infinity.

Inputs a metric is not defined on (silent, shorter than PESQ's 1/4 s, non-finite, too few speech
frames for STOI) raise :class:`MetricError` with the reason, so an evaluation run can record it per file.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Literal

import librosa
import numpy as np

from almtok_jax.audio import hann_window, resample, to_mono

try:
    import pesq as pesq_lib
    import pystoi
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"almtok_jax.metrics needs {e.name!r}: pip install 'almtok-jax[eval]'",
                              name=e.name) from e

EVAL_SAMPLE_RATE = 16000
METRIC_NAMES = ("pesq_wb", "pesq_nb", "stoi", "mrstft", "mel_distance", "si_sdr")
MIN_SECONDS = 0.25  # PESQ refuses shorter buffers; every other metric is defined from there on
SILENCE_DBFS = -80.0  # a signal whose peak is below this is treated as silent
MRSTFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # (n_fft, hop, win)
MRSTFT_POWER_FLOOR = 1e-7
MEL_SCALES = ((64, 5), (128, 10), (256, 20), (512, 40), (1024, 80), (2048, 160))  # (n_fft, n_mels)
MEL_FLOOR = 1e-5


class MetricError(ValueError):
    """A metric is undefined for this pair of signals (silent, too short, non-finite...); names the reason."""


# ------------------------------------------------------------------------------------------ preparation


def _to_16k(wav: np.ndarray, sample_rate: int, role: str) -> np.ndarray:
    wav = to_mono(np.asarray(wav, dtype=np.float32))
    if wav.size == 0:
        raise MetricError(f"the {role} signal is empty")
    if not np.all(np.isfinite(wav)):
        raise MetricError(f"the {role} signal holds NaN or infinite samples")
    if sample_rate != EVAL_SAMPLE_RATE:
        wav = np.asarray(resample(wav, int(sample_rate), EVAL_SAMPLE_RATE))
    return wav.astype(np.float64)


def prepare_pair(reference: np.ndarray, degraded: np.ndarray, reference_sr: int,
                 degraded_sr: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mono, 16 kHz, float64, trimmed to the shorter length: ``(ref (N,), deg (N,))``.

    ``reference``/``degraded`` are ``(N,)`` or ``(channels, N)`` at their own rates (``degraded_sr``
    defaults to ``reference_sr``). Raises :class:`MetricError` if either is empty, non-finite, silent, or
    the common length is under :data:`MIN_SECONDS`.
    """
    ref = _to_16k(reference, reference_sr, "reference")
    deg = _to_16k(degraded, reference_sr if degraded_sr is None else degraded_sr, "degraded")
    n = min(ref.size, deg.size)
    ref, deg = ref[:n], deg[:n]
    _check_pair(ref, deg)
    return ref, deg


def _check_pair(reference: np.ndarray, degraded: np.ndarray) -> None:
    if reference.ndim != 1 or reference.shape != degraded.shape:
        raise MetricError(f"expected two 1-D signals of equal length, got {reference.shape} "
                          f"and {degraded.shape}")
    if reference.size < MIN_SECONDS * EVAL_SAMPLE_RATE:
        raise MetricError(f"signals too short: {reference.size / EVAL_SAMPLE_RATE:.3f} s at 16 kHz, "
                          f"the metrics need at least {MIN_SECONDS} s")
    for role, x in (("reference", reference), ("degraded", degraded)):
        if not np.all(np.isfinite(x)):
            raise MetricError(f"the {role} signal holds NaN or infinite samples")
        peak = float(np.max(np.abs(x)))
        if peak <= 10 ** (SILENCE_DBFS / 20):
            raise MetricError(f"the {role} signal is silent (peak {peak:.2e}, below {SILENCE_DBFS:g} dBFS)")


# ---------------------------------------------------------------------------------------------- metrics


def pesq_score(reference: np.ndarray, degraded: np.ndarray, mode: Literal["wb", "nb"] = "wb") -> float:
    """PESQ of two equal-length 16 kHz signals: wide-band (P.862.2) or narrow-band (P.862) MOS-LQO."""
    if mode not in ("wb", "nb"):
        raise ValueError(f"PESQ mode must be 'wb' or 'nb', got {mode!r}")
    _check_pair(reference, degraded)
    try:
        return float(pesq_lib.pesq(EVAL_SAMPLE_RATE, reference, degraded, mode))
    except pesq_lib.PesqError as e:  # no utterance found, buffer too short...
        raise MetricError(f"PESQ-{mode.upper()} failed: {type(e).__name__}: {e}") from e
    except ValueError as e:  # the C code yields NaN for some degenerate inputs
        raise MetricError(f"PESQ-{mode.upper()} undefined for this pair ({e})") from e


def stoi_score(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Classic STOI of two equal-length 16 kHz signals, in [0, 1] (1 for identical signals)."""
    _check_pair(reference, degraded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi.stoi(reference, degraded, EVAL_SAMPLE_RATE, extended=False))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        # pystoi would silently return 1e-5 here
        raise MetricError("STOI undefined: fewer than 30 non-silent 10 kHz frames (about 0.4 s of speech)")
    return value


def stft_magnitude(x: np.ndarray, n_fft: int, hop: int, win: int, floor: float = 0.0) -> np.ndarray:
    """``torch.stft(center=True, pad_mode="reflect", onesided)`` magnitude: ``(frames, n_fft//2 + 1)``.

    The periodic Hann window of length ``win`` is zero-padded on both sides to ``n_fft``; the magnitude is
    ``sqrt(max(re² + im², floor))``.
    """
    if x.size <= n_fft // 2:
        raise MetricError(f"signal of {x.size} samples too short for reflect padding by {n_fft // 2}")
    left = (n_fft - win) // 2
    window = np.zeros(n_fft)
    window[left:left + win] = hann_window(win, np.float64)
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    spec = np.fft.rfft(frames * window, axis=-1)
    return np.sqrt(np.maximum(spec.real ** 2 + spec.imag ** 2, floor))


def mrstft_loss(reference: np.ndarray, degraded: np.ndarray,
                resolutions: tuple[tuple[int, int, int], ...] = MRSTFT_RESOLUTIONS) -> float:
    """Multi-resolution STFT loss (spectral convergence + log-magnitude L1) of two 16 kHz signals."""
    _check_pair(reference, degraded)
    sc, log_mag = 0.0, 0.0
    for n_fft, hop, win in resolutions:
        m_ref = stft_magnitude(reference, n_fft, hop, win, MRSTFT_POWER_FLOOR)
        m_deg = stft_magnitude(degraded, n_fft, hop, win, MRSTFT_POWER_FLOOR)
        sc += np.linalg.norm(m_ref - m_deg) / np.linalg.norm(m_ref)
        log_mag += np.mean(np.abs(np.log(m_ref) - np.log(m_deg)))
    return float((sc + log_mag) / len(resolutions))


@cache
def _mel_basis(n_fft: int, n_mels: int) -> np.ndarray:
    return librosa.filters.mel(sr=EVAL_SAMPLE_RATE, n_fft=n_fft, n_mels=n_mels, norm="slaney", htk=False)


def mel_distance(reference: np.ndarray, degraded: np.ndarray,
                 scales: tuple[tuple[int, int], ...] = MEL_SCALES) -> float:
    """Multi-scale log10-mel L1 distance of two 16 kHz signals (definition in the module docstring)."""
    _check_pair(reference, degraded)
    total = 0.0
    for n_fft, n_mels in scales:
        basis = _mel_basis(n_fft, n_mels)
        mel_ref = stft_magnitude(reference, n_fft, n_fft // 4, n_fft) @ basis.T
        mel_deg = stft_magnitude(degraded, n_fft, n_fft // 4, n_fft) @ basis.T
        log_ref = np.log10(np.maximum(mel_ref, MEL_FLOOR))
        log_deg = np.log10(np.maximum(mel_deg, MEL_FLOOR))
        total += np.mean(np.abs(log_ref - log_deg))
    return float(total / len(scales))


def si_sdr(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Scale-invariant SDR in dB: ``10 log10(‖αr‖² / ‖d − αr‖²)``, ``α = <d, r> / ‖r‖²`` on zero-mean signals.

    ``eps`` (float64 machine epsilon) is added to both energies, so identical signals give a large finite
    value rather than ``inf``.
    """
    _check_pair(reference, degraded)
    eps = np.finfo(np.float64).eps
    ref = reference - reference.mean()
    deg = degraded - degraded.mean()
    alpha = np.dot(deg, ref) / (np.dot(ref, ref) + eps)
    target = alpha * ref
    noise = deg - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


METRICS = {
    "pesq_wb": lambda r, d: pesq_score(r, d, "wb"),
    "pesq_nb": lambda r, d: pesq_score(r, d, "nb"),
    "stoi": stoi_score,
    "mrstft": mrstft_loss,
    "mel_distance": mel_distance,
    "si_sdr": si_sdr,
}


def compute_metrics(reference: np.ndarray, degraded: np.ndarray, reference_sr: int,
                    degraded_sr: int | None = None,
                    names: tuple[str, ...] = METRIC_NAMES) -> tuple[dict[str, float], dict[str, str]]:
    """All metrics of one pair: ``(values, errors)``, each keyed by metric name.

    A metric that raises :class:`MetricError` is left out of ``values`` and its reason put in ``errors``
    (every metric gets the same reason if the pair itself is unusable, e.g. silent).
    """
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; available: {list(METRICS)}")
    try:
        ref, deg = prepare_pair(reference, degraded, reference_sr, degraded_sr)
    except MetricError as e:
        return {}, {name: str(e) for name in names}
    values, errors = {}, {}
    for name in names:
        try:
            values[name] = METRICS[name](ref, deg)
        except MetricError as e:
            errors[name] = str(e)
    return values, errors
