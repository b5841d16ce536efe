"""Decoding on the tiny release: output independent of batching, sampler choice per mode, long inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from almtok_jax import tokenizer
from almtok_jax.flow.cfm import RELEASE_SAMPLER
from almtok_jax.tokenizer import ALMTokenizer2


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return ALMTokenizer2.load(tiny_checkpoint)


def _codes(tok: ALMTokenizer2, frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, tok.codebook_size, (tok.num_codebooks, frames))


def test_a_clip_decodes_the_same_alone_and_inside_a_batch(tok):
    """The noise of a clip comes from the seed and its codes, not its batch position or its neighbours."""
    clip = _codes(tok, 200, 0)  # two windows
    others = [_codes(tok, n, s) for n, s in ((60, 1), (300, 2), (20, 3))]
    alone = tok.decode_clips([clip], steps=2, seed=5)[0]
    batch = tok.decode_clips([others[0], others[1], clip, others[2]], steps=2, seed=5)[2]
    assert alone["latents"].shape[0] == 2
    np.testing.assert_allclose(batch["wave"], alone["wave"], rtol=0, atol=1e-6)
    again = tok.decode_clips([clip, clip], steps=2, seed=5)
    np.testing.assert_allclose(again[1]["wave"], alone["wave"], rtol=0, atol=1e-6)
    other_seed = tok.decode_clips([clip], steps=2, seed=6)[0]
    assert np.max(np.abs(other_seed["wave"] - alone["wave"])) > 1e-3


def test_release_mode_runs_the_reference_sampler(tiny_checkpoint):
    release = ALMTokenizer2.load(tiny_checkpoint, compat="release")
    assert release.sampler_config() == RELEASE_SAMPLER
    assert release.sampler_config(steps=3).num_steps == 3
    with pytest.raises(ValueError, match="release mode"):
        release.sampler_config(solver="heun")
    default = ALMTokenizer2.load(tiny_checkpoint)
    assert default.sampler_config(steps=7, solver="rk4").evaluations == 28


def test_codes_above_the_length_limit_are_refused_before_any_work(tok, monkeypatch):
    monkeypatch.setattr(tokenizer, "MAX_DECODE_FRAMES", 40)
    with pytest.raises(ValueError, match=r"41 code frames.*limit of 40 frames.*split"):
        tok.decode(_codes(tok, 41, 0), steps=1)
    assert tok.decode(_codes(tok, 40, 0), steps=1).shape == (40 * 1920,)


def test_infer_solver_and_steps_flags(tiny_checkpoint, tok, tmp_path, capsys):
    import infer

    np.save(tmp_path / "a.codes.npy", _codes(tok, 30, 0))
    argv = ["--checkpoint", str(tiny_checkpoint), "--decode", str(tmp_path / "a.codes.npy"), "-o", str(tmp_path / "o")]
    assert infer.main([*argv, "--solver", "bogus"]) == 2
    assert "unknown solver 'bogus'" in capsys.readouterr().err
    assert infer.main([*argv, "--solver", "heun", "--steps", "1"]) == 0
    assert (tmp_path / "o" / "a.wav").is_file()
    assert infer.main([*argv, "--solver", "heun", "--compat", "release"]) == 2
    assert "release mode" in capsys.readouterr().err


def test_student_sampler_options_are_checked(tok):
    """A baked-guidance student cannot sample at another scale, and only a student takes the shortcut solver."""
    with pytest.raises(ValueError, match="solver 'shortcut' needs a distilled few-step flow decoder"):
        tok.sampler_config(solver="shortcut")
    sampler = replace(tok.config.sampler, guidance="baked")
    student = ALMTokenizer2(tok.variables, replace(tok.config, sampler=sampler), tok.compat)
    assert student.sampler_config(guidance=sampler.guidance_scale).sampling_scale == 1.0
    with pytest.raises(ValueError, match=r"guidance 2.5: this model's flow decoder has guidance scale .* baked in"):
        student.sampler_config(guidance=2.5)
