"""Audio front end: file reading errors, the resampler's properties, the Whisper log-mel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, FIXTURES

from almtok_jax.audio import (
    AudioError,
    LogMelConfig,
    Resampler,
    load_audio,
    load_mono,
    resample,
    resample_plan,
    resampled_length,
    sinc_resample_kernel,
    to_mono,
    whisper_log_mel,
)

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------- files


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="garbage.wav"):
        load_audio(bad)
    with pytest.raises(AudioError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 24000)
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    wav = RNG.uniform(-0.5, 0.5, 1000).astype(np.float32)
    wav[10] = np.nan
    sf.write(path, wav, 24000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(path)


def test_int16_scaling_and_formats(tmp_path):
    pcm = np.array([0, 1, -1, 16384, -32768, 32767], np.int16)
    for name in ("a.wav", "a.flac"):
        sf.write(tmp_path / name, pcm, 16000, subtype="PCM_16")
        wav, sr = load_audio(tmp_path / name)
        assert sr == 16000 and wav.shape == (1, pcm.size) and wav.dtype == np.float32
        np.testing.assert_array_equal(wav[0], pcm / 2**15)
    tone = (0.3 * np.sin(np.arange(4800) * 0.05)).astype(np.float32)
    sf.write(tmp_path / "a.ogg", tone, 24000, format="OGG", subtype="VORBIS")
    wav, sr = load_audio(tmp_path / "a.ogg")
    assert sr == 24000 and wav.shape[0] == 1 and abs(wav.shape[1] - tone.size) < 1024


def test_stereo_48k_to_mono_24k(tmp_path):
    left, right = RNG.uniform(-0.5, 0.5, (2, 4801)).astype(np.float32)
    path = tmp_path / "stereo48k.wav"
    sf.write(path, np.stack([left, right], 1), 48000, subtype="FLOAT")
    wav, sr = load_audio(path)
    assert (wav.shape, sr) == ((2, 4801), 48000)
    np.testing.assert_allclose(to_mono(wav), (left + right) / 2, atol=1e-7)
    mono24 = load_mono(path, 24000)
    assert mono24.shape == (resampled_length(4801, 48000, 24000),) == (2401,)
    np.testing.assert_allclose(mono24, np.asarray(resample(jnp.asarray((left + right) / 2), 48000, 24000)),
                               atol=1e-7)


def test_shared_48k_clip():
    wav, sr = load_audio(AUDIO / "speech48k" / "Front_Center.wav")
    assert sr == 48000 and wav.shape[0] == 1
    mono = load_mono(AUDIO / "speech48k" / "Front_Center.wav")
    assert mono.shape == (resampled_length(wav.shape[1], 48000, 24000),)
    assert np.all(np.isfinite(mono)) and 0.01 < np.abs(mono).max() <= 1.0


# -------------------------------------------------------------------------------------- resampler


def test_kernel_reference_values():
    k = sinc_resample_kernel(24000, 16000)
    assert k.shape == (2, 1, 23) and k.dtype == np.float32
    np.testing.assert_allclose(k[0, 0, 9:12], [0.27069181, 0.66000003, 0.27069181], atol=1e-7)
    np.testing.assert_allclose(k[1, 0, 11:13], [0.54388559, 0.54388559], atol=1e-7)
    np.testing.assert_allclose(k.sum(-1)[:, 0], [1.00042, 1.00051], atol=1e-5)
    assert (resample_plan(24000, 16000).width, resample_plan(44100, 24000).taps) == (10, 171)


def test_output_lengths():
    assert resampled_length(288240, 24000, 16000) == 192160
    # torchaudio's float32 ceil (fixture length_quirk_cases): one short of the exact ceil.
    assert resampled_length(240854, 44100, 24000) == 131077
    assert resampled_length(120427, 22050, 24000) == 131077
    x = jnp.zeros((3, 1001))
    for orig, new in ((24000, 16000), (16000, 24000), (22050, 24000), (44100, 24000), (48000, 24000),
                      (8000, 24000)):
        assert resample(x, orig, new).shape == (3, resampled_length(1001, orig, new))


def test_resample_batch_equals_per_example_and_jits_once():
    x = jnp.asarray(RNG.standard_normal((2, 3, 997)), jnp.float32)
    batched = resample(x, 24000, 16000)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(batched[i, j], resample(x[i, j], 24000, 16000), atol=1e-7)
    before = resample._cache_size()
    resample(x + 1.0, 24000, 16000)
    resample(x * 2.0, 24000, 16000)
    assert resample._cache_size() == before


def test_resampler_module_uses_given_kernel():
    model = Resampler(24000, 16000)
    x = jnp.asarray(RNG.standard_normal((2, 500)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["buffers"]["kernel"], sinc_resample_kernel(24000, 16000))
    np.testing.assert_allclose(model.apply(variables, x), resample(x, 24000, 16000), atol=0)
    doubled = {"buffers": {"kernel": 2 * variables["buffers"]["kernel"]}}
    np.testing.assert_allclose(model.apply(doubled, x), 2 * resample(x, 24000, 16000), atol=1e-6)


def test_resample_bad_inputs():
    with pytest.raises(ValueError, match="sample rate 0 Hz is not supported"):
        resample(jnp.zeros(10), 24000, 0)
    with pytest.raises(ValueError, match="kernel"):
        resample(jnp.zeros(10), 24000, 16000, jnp.zeros((2, 1, 22)))
    with pytest.raises(AudioError, match="empty"):
        resample(jnp.zeros((2, 0)), 24000, 16000)


# ------------------------------------------------------------------------------------- Whisper mel


def test_log_mel_shape_silence_and_per_example_clamp():
    wav = RNG.uniform(-0.5, 0.5, (2, 16000)).astype(np.float32)
    wav[1] *= 1e-3
    mel = whisper_log_mel(wav)
    assert mel.shape == (2, 3000, 80)
    for i in range(2):
        np.testing.assert_allclose(mel[i], whisper_log_mel(wav[i])[0], atol=1e-6)
    np.testing.assert_array_equal(whisper_log_mel(np.zeros(100, np.float32)), -1.5)


def test_log_mel_longer_than_30s_is_an_error():
    too_long = np.zeros(480001, np.float32)
    with pytest.raises(AudioError, match="longer than Whisper's 30 s window"):
        whisper_log_mel(too_long)
    assert whisper_log_mel(too_long, crop=True).shape == (1, 3000, 80)
    with pytest.raises(AudioError, match="empty"):
        whisper_log_mel(np.zeros(0, np.float32))


def test_log_mel_end_to_end_from_24k_audio():
    """Our resampler + log-mel reproduce the encoder fixture's stored mel (5e-5, fixture README)."""
    with np.load(FIXTURES / "experts" / "whisper_encoder_tiny.npz") as z:
        audio, mel = z["in/audio24k_quirk"], z["in/mel_quirk"]
    ours = whisper_log_mel(resample(jnp.asarray(audio), 24000, 16000), LogMelConfig())
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1), mel, atol=5e-5)


@pytest.mark.parametrize(("rate", "length"), [(16000, 16037), (44100, 4410), (48000, 96000), (22050, 1)])
def test_tokenizer_resampling_pads_to_whole_seconds_without_changing_a_sample(rate, length):
    """``ALMTokenizer2.to_model_rate`` compiles once per duration in seconds (zero padding to whole seconds)
    and gives exactly the unpadded resampler's samples, mono and stereo."""
    from almtok_jax.config import ALMTokenizer2Config
    from almtok_jax.tokenizer import ALMTokenizer2

    tok = ALMTokenizer2({}, ALMTokenizer2Config())
    wav = np.random.default_rng(length).standard_normal((2, length)).astype(np.float32)
    expected = np.asarray(resample(jnp.asarray(wav), rate, 24000))
    np.testing.assert_array_equal(tok.to_model_rate(wav, rate), expected)
    np.testing.assert_array_equal(tok.to_model_rate(wav[0], rate), expected[0])
