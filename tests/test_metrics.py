"""Evaluation metrics on signals with known answers: identical, scaled, noisy at a known SNR, degenerate."""

from __future__ import annotations

import jax
import librosa
import numpy as np
import pytest
from conftest import AUDIO

from almtok_jax.audio import load_audio
from almtok_jax.metrics import (
    MRSTFT_RESOLUTIONS,
    MetricError,
    compute_metrics,
    mel_distance,
    mrstft_loss,
    pesq_score,
    prepare_pair,
    si_sdr,
    stft_magnitude,
    stoi_score,
)

SR = 16000


def white_noise(seed: int, n: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (n,)), dtype=np.float64)


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = white_noise(seed, x.size)
    noise *= np.sqrt(np.sum(x ** 2) / np.sum(noise ** 2) / 10 ** (snr_db / 10))
    return x + noise


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """2.08 s of VCTK speech at 16 kHz (float64)."""
    wav, sr = load_audio(AUDIO / "speech" / "p225_001.wav")
    ref, _ = prepare_pair(wav, wav, sr)
    return ref


def test_identical_signals_are_at_the_maximum(speech):
    values, errors = compute_metrics(speech, speech, SR)
    assert errors == {}
    assert values["pesq_wb"] == pytest.approx(4.644, abs=0.005)
    assert values["pesq_nb"] == pytest.approx(4.549, abs=0.005)
    assert values["stoi"] == pytest.approx(1.0, abs=1e-9)
    assert values["mrstft"] == 0.0
    assert values["mel_distance"] == 0.0
    assert np.isfinite(values["si_sdr"]) and values["si_sdr"] > 100


def test_prepare_pair_resamples_and_trims():
    wav, sr = load_audio(AUDIO / "speech" / "p225_001.wav")
    ref, deg = prepare_pair(wav, wav[:, : sr * 2], sr)  # (channels, N) input, degraded cut to 2 s
    assert ref.shape == deg.shape == (2 * SR,)
    ref16, deg16 = prepare_pair(ref, wav[0], SR, sr)  # mixed rates: 16 kHz vs 24 kHz
    assert ref16.shape == deg16.shape


def test_si_sdr_is_scale_invariant_and_matches_snr(speech):
    assert si_sdr(speech, 0.25 * speech) > 100
    noisy = add_noise(speech, 10.0)
    assert si_sdr(speech, 3.0 * noisy) == pytest.approx(si_sdr(speech, noisy), abs=1e-9)
    for snr in (0.0, 10.0, 20.0):
        assert si_sdr(speech, add_noise(speech, snr, seed=int(snr))) == pytest.approx(snr, abs=0.5)


def test_noise_lowers_every_score(speech):
    clean, _ = compute_metrics(speech, speech, SR)
    mild, _ = compute_metrics(speech, add_noise(speech, 20.0), SR)
    strong, errors = compute_metrics(speech, add_noise(speech, 5.0), SR)
    assert errors == {}
    for name in ("pesq_wb", "pesq_nb", "stoi", "si_sdr"):
        assert clean[name] > mild[name] > strong[name], name
    for name in ("mrstft", "mel_distance"):
        assert clean[name] < mild[name] < strong[name], name
    assert strong["pesq_wb"] < 2.0 and strong["stoi"] < 0.9


def test_gain_has_known_spectral_distances():
    x = 0.3 * white_noise(1, SR)  # loud enough that no magnitude hits the floors
    assert mrstft_loss(x, 2 * x) == pytest.approx(1 + np.log(2), abs=1e-9)  # SC = 1, |ln 2|
    assert mel_distance(x, 2 * x) == pytest.approx(np.log10(2), abs=1e-9)


@pytest.mark.parametrize("n_fft,hop,win", MRSTFT_RESOLUTIONS)
def test_stft_matches_torch_convention(n_fft, hop, win):
    """Centred reflect-padded frames, periodic Hann of length win centred in n_fft (librosa's convention)."""
    x = white_noise(2, 5000)
    ours = stft_magnitude(x, n_fft, hop, win)
    theirs = np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, window="hann",
                                 center=True, pad_mode="reflect")).T
    assert ours.shape == theirs.shape == (1 + x.size // hop, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)


def test_silent_input_is_a_metric_error(speech):
    with pytest.raises(MetricError, match="degraded signal is silent"):
        pesq_score(speech, np.zeros_like(speech))
    values, errors = compute_metrics(np.zeros_like(speech), speech, SR)
    assert values == {} and len(errors) == 6
    assert all("reference signal is silent" in reason for reason in errors.values())


def test_too_short_and_non_finite_inputs(speech):
    with pytest.raises(MetricError, match="too short"):
        prepare_pair(speech[:3000], speech[:3000], SR)
    with pytest.raises(MetricError, match="too short"):
        si_sdr(speech[:3000], speech[:3000])
    bad = speech.copy()
    bad[10] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        prepare_pair(speech, bad, SR)
    with pytest.raises(MetricError, match="empty"):
        prepare_pair(speech, np.zeros(0), SR)


def test_stoi_needs_enough_frames():
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(0.3 * SR)) / SR)  # 0.3 s: < 30 STOI frames
    with pytest.raises(MetricError, match="STOI undefined"):
        stoi_score(tone, tone)
    values, errors = compute_metrics(tone, tone, SR)
    assert "stoi" in errors and "stoi" not in values and values["mrstft"] == 0.0


def test_pesq_mode_is_checked(speech):
    with pytest.raises(ValueError, match="'wb' or 'nb'"):
        pesq_score(speech, speech, "xb")
