"""Window/segment arithmetic of the long-audio pipeline against the reference's own tables."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES

from almtok_jax.pipeline import (
    PipelineConfig,
    cross_fade,
    num_segments,
    num_tokens,
    plan_windows,
    segment_audio,
    window_codes,
)

CFG = PipelineConfig()


@pytest.fixture(scope="module")
def tables():
    z = np.load(FIXTURES / "release_tiny" / "expected.npz")
    return {k: z[k] for k in z.files if "arith" in k}


def test_release_token_and_segment_counts(tables):
    lens = tables["in/arith_audio_len"]
    assert [num_tokens(int(n), CFG, "release") for n in lens] == tables["out/arith_out_len"].tolist()
    assert [num_segments(int(n), CFG, "release") for n in lens] == tables["out/arith_n_segments"].tolist()


def test_release_window_plan(tables):
    plans = [plan_windows(int(n), CFG, "release") for n in tables["in/arith_codes_len"]]
    crash = tables["out/arith_crash"].astype(bool)
    assert [p.crashes for p in plans] == crash.tolist()
    ok = ~crash
    assert np.array_equal(np.array([p.num_windows for p in plans])[ok], tables["out/arith_n_windows"][ok])
    assert np.array_equal(np.array([p.padded_len for p in plans])[ok], tables["out/arith_padded_len"][ok])
    assert np.array_equal(np.array([p.target_len for p in plans])[ok], tables["out/arith_wave_len"][ok])


def test_default_mode_never_crashes_and_covers_input():
    for n in range(1, 800):
        p = plan_windows(n, CFG, "default")
        assert not p.crashes
        assert (p.padded_len - p.overlap) % p.hop == 0
        assert p.wave_window + (p.num_windows - 1) * p.wave_hop >= n * 1920


def test_release_crash_lengths_raise():
    p = plan_windows(241, CFG, "release")
    assert p.crashes
    with pytest.raises(ValueError, match="B3"):
        window_codes(np.zeros((8, 241), np.int64), p)


def test_segments_are_periodic_extension():
    wav = np.arange(100_000, dtype=np.float32)
    seg = segment_audio(wav, CFG, "release")
    assert seg.shape == (2, 288240)
    assert seg[1, 0] == (288240 % 100_000)
    seg_default = segment_audio(wav, CFG, "default")
    assert seg_default.shape == (1, 288240)
    np.testing.assert_array_equal(seg_default[0], seg[0])


def test_cross_fade_lengths_and_ramp():
    p = plan_windows(300, CFG, "default", num_samples=300 * 1920 - 5)
    wins = [np.full(p.wave_window, k + 1.0, np.float32) for k in range(p.num_windows)]
    out = cross_fade(wins, p)
    assert out.shape == (300 * 1920 - 5,)
    assert out[0] == 1.0 and out[p.wave_hop - 1] == 1.0
    assert out[p.wave_window] == 2.0
