"""End to end on the tiny release fixture: convert, tokenize, detokenize, through the user-facing commands."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, FIXTURES

import convert_torch_weights
import infer
from almtok_jax.flow.cfm import RELEASE_SAMPLER
from almtok_jax.golden.runner import fixture_atols
from almtok_jax.tokenizer import ALMTokenizer2, flatten, unflatten

RELEASE = FIXTURES / "release_tiny"
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_release.yaml"


@pytest.fixture(scope="module")
def expected():
    return np.load(RELEASE / "expected.npz")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    # no --config: the architecture comes from the release (equal to TINY, tests/test_release_derive.py)
    assert convert_torch_weights.main(["--release", str(RELEASE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tok(checkpoint):
    return ALMTokenizer2.load(checkpoint)


def _x0(expected, clip: str, windows: int) -> np.ndarray:
    """Initial ODE state of each window: draw 2k+1 of the clip (the fixture README, section 5)."""
    return np.stack([expected[f"in/noise_{clip}_{2 * k + 1:03d}"][0] for k in range(windows)])


@pytest.mark.parametrize("clip", ["speech", "music"])
def test_infer_release_mode_reproduces_the_reference(checkpoint, expected, tmp_path, clip):
    wav_in = tmp_path / f"{clip}.wav"
    sf.write(wav_in, expected[f"in/audio_{clip}"].T, int(expected[f"in/sr_{clip}"]), subtype="FLOAT")
    windows = expected[f"out/dec_latents_{clip}"].shape[0]
    np.save(tmp_path / "noise.npy", _x0(expected, clip, windows))
    rc = infer.main(["--checkpoint", str(checkpoint), str(wav_in), "-o", str(tmp_path / "out"), "--compat",
                     "release", "--steps", str(int(expected["in/num_steps"])), "--noise", str(tmp_path / "noise.npy")])
    assert rc == 0
    codes = np.load(tmp_path / "out" / f"{clip}.codes.npy")
    np.testing.assert_array_equal(codes, expected[f"out/codes_{clip}"][0])
    wave, sr = sf.read(tmp_path / "out" / f"{clip}.wav", dtype="float32")
    assert sr == 24000
    np.testing.assert_allclose(wave, expected[f"out/wave_{clip}"][0], rtol=0, atol=6e-6)


def test_release_with_real_query_heads_converts_without_config_and_reproduces_the_reference(tmp_path):
    """``release_rope64``: 128-wide query heads (RoPE dim 64), whose torch-made ``inv_freq`` buffers a
    float32 pow misses by 2 ulp; converted with no ``--config``, release mode gives the reference's codes."""
    release = FIXTURES / "release_rope64"
    expected = np.load(release / "expected.npz")
    atol = fixture_atols(json.loads(str(expected["meta"])), ["wave_speech"])["wave_speech"]
    out = tmp_path / "rope64"
    assert convert_torch_weights.main(["--release", str(release), "--out", str(out)]) == 0
    wav_in = tmp_path / "speech.wav"
    sf.write(wav_in, expected["in/audio_speech"].T, int(expected["in/sr_speech"]), subtype="FLOAT")
    np.save(tmp_path / "noise.npy", _x0(expected, "speech", expected["out/dec_latents_speech"].shape[0]))
    assert infer.main(["--checkpoint", str(out), str(wav_in), "-o", str(tmp_path / "out"), "--compat", "release",
                       "--steps", str(int(expected["in/num_steps"])), "--noise", str(tmp_path / "noise.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "speech.codes.npy"), expected["out/codes_speech"][0])
    wave, _ = sf.read(tmp_path / "out" / "speech.wav", dtype="float32")
    np.testing.assert_allclose(wave, expected["out/wave_speech"][0], rtol=0, atol=atol)


def test_default_mode_long_music_keeps_the_input_length(tok):
    clips = [sf.read(p, dtype="float32")[0] for p in sorted((AUDIO / "music").glob("*.wav"))[:2]]
    wav = np.concatenate(clips)[: 40 * 24000]
    assert len(wav) == 40 * 24000
    codes = tok.encode(wav, 24000)
    assert codes.shape == (8, 40 * 24000 // 1920 + 1)
    out = tok.decode(codes, steps=2, length=len(wav))
    assert out.shape == wav.shape and np.all(np.isfinite(out))


def test_default_mode_b1_b2_in_the_decoded_output(tok):
    """Through the real decode loop (3 windows, 1 sampler step): B1, window k's prompt is window k-1's
    latent frames [222, 286) (2H with H = 111, 64 frames); B2, window k's samples land at k * 213120
    (H * 1920), so outside the cross-fades the output is that window's own waveform."""
    codes = np.random.default_rng(0).integers(0, 16, (8, 300))
    out = tok.decode_clips([codes], steps=1)[0]
    latents, prompts, wavs, wave = out["latents"], out["prompts"], out["window_wavs"], out["wave"]
    assert latents.shape[:2] == (3, 300) and prompts.shape[:2] == (2, 64)
    for k in (1, 2):
        np.testing.assert_array_equal(prompts[k - 1], latents[k - 1][222:286])
    hop, overlap = 111 * 1920, 39 * 1920
    assert wave.shape == (300 * 1920,)
    np.testing.assert_array_equal(wave[:hop], wavs[0][:hop])
    np.testing.assert_array_equal(wave[hop + overlap: 2 * hop], wavs[1][overlap:hop])
    np.testing.assert_array_equal(wave[2 * hop + overlap:], wavs[2][overlap: 300 * 1920 - 2 * hop])


def test_single_window_modes_agree(checkpoint, expected):
    """For audio that fits one window both modes give the same codes and waveform (same noise, same sampler)."""
    wav = expected["in/audio_speech"][0]
    release, default = (ALMTokenizer2.load(checkpoint, compat=m) for m in ("release", "default"))
    default.config = replace(default.config, sampler=RELEASE_SAMPLER)  # the default mode's sampler differs
    codes = release.encode(wav, 24000)
    np.testing.assert_array_equal(default.encode(wav, 24000), codes)
    noise = _x0(expected, "speech", 1)
    a = release.decode(codes, steps=2, noise=noise)
    b = default.decode(codes, steps=2, noise=noise)
    np.testing.assert_array_equal(a, b)


def test_token_layout(tok):
    codes = np.arange(24).reshape(8, 3) % tok.codebook_size
    tokens = tok.flatten(codes)
    assert tokens[:8].tolist() == [codes[q, 0] + 10000 * q for q in range(8)]
    np.testing.assert_array_equal(unflatten(flatten(codes), 8), codes)
    assert tok.vocab_size == 7 * 10000 + tok.codebook_size
    assert tok.frame_rate == 12.5 and tok.sample_rate == 24000 and tok.num_codebooks == 8


def test_stereo_and_rates(tok):
    left, sr = sf.read(AUDIO / "speech48k" / "Front_Left.wav", dtype="float32")
    stereo = np.stack([left, left[::-1]])
    mixed = tok.encode(stereo, sr)
    assert mixed.shape[0] == 8
    separate = tok.encode(stereo, sr, channels="separate")
    assert separate.shape == (2, *mixed.shape)
    low = tok.encode(np.sin(np.arange(8000) / 8.0).astype(np.float32), 8000)
    assert low.shape == (8, 24000 // 1920 + 1)


def test_bad_inputs_are_reported_and_skipped(checkpoint, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    sf.write(inp / "silence.wav", np.zeros(24000, np.float32), 24000)
    sf.write(inp / "short.wav", rng.standard_normal(1200).astype(np.float32) * 0.1, 24000)  # 0.05 s
    sf.write(inp / "stereo48k.wav", rng.standard_normal((9600, 2)).astype(np.float32) * 0.1, 48000)
    sf.write(inp / "empty.wav", np.zeros(0, np.float32), 24000)
    nan = rng.standard_normal(4800).astype(np.float32)
    nan[100] = np.nan
    sf.write(inp / "nan.wav", nan, 24000, subtype="FLOAT")
    (inp / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    rc = infer.main(["--checkpoint", str(checkpoint), str(inp), "-o", str(tmp_path / "out"), "--steps", "1"])
    assert rc == 1
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{n}{ext}" for n in ("short", "silence", "stereo48k") for ext in (".codes.npy", ".wav"))
    for n, seconds in (("short", 0.05), ("silence", 1.0), ("stereo48k", 0.2)):
        wave, _ = sf.read(tmp_path / "out" / f"{n}.wav")
        assert len(wave) == round(seconds * 24000) and np.all(np.isfinite(wave))


def test_decode_codes_files(checkpoint, expected, tmp_path):
    np.save(tmp_path / "a.codes.npy", expected["out/codes_speech48k"][0])
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    rc = infer.main(["--checkpoint", str(checkpoint), "--decode", str(tmp_path / "a.codes.npy"),
                     str(tmp_path / "bad.npy"), "-o", str(tmp_path / "out"), "--steps", "1"])
    assert rc == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.wav"]


def test_release_folder_missing_file(tmp_path, capsys):
    broken = tmp_path / "release"
    shutil.copytree(RELEASE, broken)
    (broken / "sqcodec.pth").unlink()
    rc = convert_torch_weights.main(["--release", str(broken), "--config", str(TINY), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "sqcodec.pth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_checkpoint_with_a_wrong_shape(tmp_path, capsys):
    """A config that disagrees with one tensor of the checkpoint is refused, naming the key and shapes."""
    text = TINY.read_text().replace("codebook_dim: 8", "codebook_dim: 16")
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text(text)
    rc = convert_torch_weights.main(["--release", str(RELEASE), "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "wrong shape" in err and "project_in" in err
    assert not (tmp_path / "o").exists()


def test_output_is_not_overwritten_without_force(checkpoint, capsys):
    rc = convert_torch_weights.main(["--release", str(RELEASE), "--config", str(TINY), "--out", str(checkpoint)])
    assert rc == 1
    assert "not empty" in capsys.readouterr().err
    assert (checkpoint / "config.yaml").is_file()


def test_model_directory_written_before_compat_left_the_config_still_loads(checkpoint, tmp_path):
    """Model directories converted earlier hold ``quantizer.compat``: ignored with a warning; the runtime
    argument decides."""
    import yaml

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert "compat" not in config["quantizer"]
    config["quantizer"]["compat"] = "default"
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.warns(UserWarning, match="ignoring quantizer.compat='default'"):
        tok = ALMTokenizer2.load(old, compat="release")
    assert tok.compat == "release" and tok.config == ALMTokenizer2.load(checkpoint).config


def test_tiny_preset_is_the_release_fixture_architecture(expected):
    import json

    from almtok_jax.config import load_model_config
    from almtok_jax.golden.release import config_from_arch

    arch = json.loads(str(expected["meta"]))["config"]["arch"]
    assert config_from_arch(arch) == load_model_config(TINY)


def test_readme_main_job_commands_run_offline(tmp_path):
    """The README's quick-start command (after the install step) runs as written on the tiny release."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = re.search(r"Set up and run the main job.*?```bash\n(.*?)```", readme, re.S).group(1)
    steps = [c.strip() for c in block.strip().split("&&")]
    assert steps[0].startswith("python3 -m venv") and "pip install" in steps[1]
    outputs = [repo / "checkpoints" / "tiny", repo / "out" / "p225_001.wav", repo / "out" / "p225_001.codes.npy"]
    for step in steps[2:]:
        argv = step.split()
        assert argv[0] == ".venv/bin/python"
        subprocess.run([sys.executable, *argv[1:]], cwd=repo, check=True, timeout=600)
    assert all(p.exists() for p in outputs)
    wave, sr = sf.read(outputs[1])
    assert sr == 24000 and len(wave) == len(sf.read(AUDIO / "speech" / "p225_001.wav")[0])


def test_evaluate_the_tiny_release_model(checkpoint, tmp_path):
    """``python -m almtok_jax.cli.evaluate`` with a real converted checkpoint writes CSV, JSON and PNGs."""
    import json

    from almtok_jax.cli import evaluate

    data = tmp_path / "clips"
    data.mkdir()
    for name in ("p225_001.wav", "p231_001.wav"):
        shutil.copy(AUDIO / "speech" / name, data)
    evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "-o", str(tmp_path / "eval"),
                   "--steps", "1", "--plots", "1"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["files"] == 2 and summary["files_with_errors"] == 0
    assert set(summary["metrics"]) == {"pesq_wb", "pesq_nb", "stoi", "mrstft", "mel_distance", "si_sdr"}
    assert summary["bitrate_bps"] == 12.5 * 8 * np.log2(64)  # tiny codebooks: 64 codes
    assert (tmp_path / "eval" / "metrics.csv").is_file() and len(list((tmp_path / "eval" / "plots").glob("*.png"))) == 1
