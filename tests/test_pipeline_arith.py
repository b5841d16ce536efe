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
    hop, window = 111 * 1920, 150 * 1920  # spec 03 §6.3 B2 fix: S_h = H * 1920, S = W * 1920 (H = 111, W = 150)
    assert out[0] == 1.0 and out[hop - 1] == 1.0 and out[hop] == 1.0 and 1.0 < out[hop + 1] < 2.0
    assert out[window] == 2.0


# Spec 03 §6.2 table (W, H, O, T_w and the reference's waveform numbers) and the README's default-mode
# column, written out here rather than read from the plan under test.
SPEC_WINDOWS = [  # d, W, H, O, T_w, release S, release S_h
    (12.0, 150, 111, 39, 300, 288000, 216000),
    (20.0, 250, 186, 64, 500, 480000, 360000),
    (20.48, 256, 192, 64, 512, 491520, 368640),
]


@pytest.mark.parametrize("d, w, h, o, t_w, s, s_h", SPEC_WINDOWS)
def test_default_mode_b1_prompt_is_the_same_audio_64_frames(d, w, h, o, t_w, s, s_h):
    """B1: the prompt of window k is the previous window's frames [2H, 2H + 64) (same audio, 64 frames as
    in training, at most 2*O); the reference takes its last O//2 frames."""
    cfg = PipelineConfig(min_duration=d)
    default, release = plan_windows(4 * w, cfg, "default"), plan_windows(4 * w, cfg, "release")
    assert (default.window, default.hop, default.overlap, default.latent_frames) == (w, h, o, t_w)
    assert (default.prompt_start, default.prompt_frames) == (2 * h, min(64, 2 * o))
    assert default.prompt_start + default.prompt_frames <= t_w
    assert (release.prompt_start, release.prompt_frames) == (t_w - o // 2, o // 2)


def test_default_mode_b1_numbers_for_the_release_window():
    p = plan_windows(400, CFG, "default")
    assert (p.prompt_start, p.prompt_frames) == (222, 64)  # README: frames [2H, 2H + 64) with H = 111
    release = plan_windows(400, CFG, "release")
    assert (release.prompt_start, release.prompt_frames) == (281, 19)  # the last O // 2 = 19 of T_w = 300


@pytest.mark.parametrize("d, w, h, o, t_w, s, s_h", SPEC_WINDOWS)
def test_default_mode_b2_wave_hop_is_the_token_hop(d, w, h, o, t_w, s, s_h):
    """B2: default-mode waveform hop/overlap/window are H, O, W tokens of 1920 samples; the reference's are
    int(d * 24000) and its (S // 4) * 3, which differ from the token hop unless W is divisible by 4."""
    cfg = PipelineConfig(min_duration=d)
    default, release = plan_windows(4 * w, cfg, "default"), plan_windows(4 * w, cfg, "release")
    assert (default.wave_window, default.wave_hop, default.wave_overlap) == (w * 1920, h * 1920, o * 1920)
    assert (release.wave_window, release.wave_hop, release.wave_overlap) == (s, s_h, s - s_h)
    assert (release.wave_hop == default.wave_hop) == (w % 4 == 0)
