"""Long-audio pipeline: segmentation for encoding, overlapping windows for decoding, cross-fade.

The reference (``infer.py`` ``sound2code`` / ``code2sound``) encodes 12 s segments and decodes 12 s
windows that overlap by a quarter, each window continuing from the previous one through an in-context
latent prompt, and cross-fades the decoded waveforms. Two modes:

* ``compat="release"`` reproduces the reference exactly, defects included (spec ``03-flow-dit.md`` §6.3).
* ``compat="default"`` fixes them; for audio that fits one window both modes agree:

  - B1: the prompt of window k is the previous window's latents over the *same* audio (frames
    ``[2H, 2H + prompt_frames)``), placed at frames ``[0, prompt_frames)``; the reference takes the last
    ``O//2`` frames, ~2.4 s later than where it puts them.
  - B2: the waveform hop and overlap follow the token hop (``H * 1920`` samples), so windows do not drift.
  - B3: the code sequence is padded whenever the windows do not tile it (the reference tests the wrong
    remainder and crashes for some lengths).
  - B5: encoding segments advance by exactly 12 s (the reference skips 240 samples per segment), the token
    count uses exact integer arithmetic, and decoding can be trimmed to the input length.

All functions here are index arithmetic on NumPy arrays; no network runs here (the tokenizer runs them on
the segments and windows planned here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from almtok_jax.audio import SAMPLE_RATE
from almtok_jax.compat import Compat, check_compat


@dataclass(frozen=True)
class PipelineConfig:
    """Window and rate constants of the long-audio pipeline (the release values by default)."""

    sample_rate: int = SAMPLE_RATE
    token_rate: float = 12.5
    latent_rate: float = 25.0
    min_duration: float = 12.0          # seconds per encode segment and per decode window
    segment_extra_samples: int = 240    # encode segments are this much longer than min_duration
    encode_batch_size: int = 6
    prompt_frames: int = 64             # default mode: aligned in-context prompt length (latent frames)

    @property
    def samples_per_token(self) -> int:
        return int(round(self.sample_rate / self.token_rate))

    @property
    def segment_samples(self) -> int:
        return int(self.min_duration * self.sample_rate)


# ----------------------------------------------------------------------------------------------------
# Encoding: tokens per clip and 12 s segments.


def num_tokens(num_samples: int, cfg: PipelineConfig, compat: Compat = "default") -> int:
    """Tokens for a clip of ``num_samples`` (24 kHz): ``N / 1920 + 1`` rounded down.

    The release evaluates ``int(N / 24000 * 12.5) + 1`` in floating point, which lands one token short
    for some multiples of 1920 samples; the default mode uses exact integer arithmetic.
    """
    if num_samples <= 0:
        raise ValueError(f"audio has {num_samples} samples; need at least 1")
    if compat == "release":
        return int(num_samples / float(cfg.sample_rate) * cfg.token_rate) + 1
    return num_samples // cfg.samples_per_token + 1


def num_segments(num_samples: int, cfg: PipelineConfig, compat: Compat = "default") -> int:
    """How many 12 s segments are encoded.

    Release: the reference's repetition padding (double until at least one segment long, then
    ``len // S + 1``). Default: just enough segments to cover the tokens kept.
    """
    seg = cfg.segment_samples
    if compat == "release":
        length = num_samples
        while length < seg + cfg.segment_extra_samples:
            length *= 2
        return length // seg + 1
    return math.ceil(num_tokens(num_samples, cfg, compat) / (seg // cfg.samples_per_token))


def segment_audio(wav: np.ndarray, cfg: PipelineConfig, compat: Compat = "default") -> np.ndarray:
    """Cut a mono 24 kHz clip ``(N,)`` into encode segments ``(n_seg, S + 240)``.

    The clip is extended periodically (sample ``i`` beyond the end is ``wav[i mod N]``), as the
    reference's repetition padding does. Release segments start every ``S + 240`` samples; default
    segments every ``S`` samples, so each segment's 150 tokens stand for exactly its own 12 s.
    """
    n = wav.shape[-1]
    n_seg = num_segments(n, cfg, compat)
    length = cfg.segment_samples + cfg.segment_extra_samples
    hop = length if compat == "release" else cfg.segment_samples
    index = (np.arange(n_seg)[:, None] * hop + np.arange(length)[None, :]) % n
    return wav[index]


# ----------------------------------------------------------------------------------------------------
# Decoding: windows of codes and the waveform cross-fade.


@dataclass(frozen=True)
class WindowPlan:
    """Token/frame/sample arithmetic of ``code2sound`` for one clip of ``num_codes`` tokens."""

    window: int           # W: tokens per window
    hop: int              # H: token hop between windows
    overlap: int          # O = W - H
    prompt_frames: int    # latent frames of in-context prompt for windows >= 1
    prompt_start: int     # first frame of the previous window's latents used as prompt
    latent_frames: int    # T_w: latent frames per window
    padded_len: int       # Np: code length after tiling
    num_windows: int      # K
    wave_window: int      # S: samples kept per decoded window
    wave_hop: int         # S_h
    wave_overlap: int     # S_o
    target_len: int       # output samples
    crashes: bool = False  # the reference would crash on this length (release mode only)


def plan_windows(num_codes: int, cfg: PipelineConfig, compat: Compat = "default",
                 num_samples: int | None = None) -> WindowPlan:
    """Window plan for ``num_codes`` tokens; ``num_samples`` (default mode) trims the output to it."""
    check_compat(compat)
    if num_codes <= 0:
        raise ValueError(f"need at least one code frame, got {num_codes}")
    d = cfg.min_duration
    w = int(d * cfg.token_rate)
    h = (w // 4) * 3
    o = w - h
    t_w = int(d * cfg.latent_rate)
    if t_w != 2 * w:
        raise ValueError(f"min_duration {d} s gives {w} tokens but {t_w} latent frames; pick a multiple of 0.08 s")
    n1 = max(num_codes, w)
    if compat == "release":
        needs_pad = (n1 - o // 2) % h > 0
    else:
        needs_pad = (n1 - o) % h > 0
    padded = math.ceil((n1 - o) / h) * h + o if needs_pad else n1
    num_windows = len(range(0, padded - h, h))
    last_len = padded - (num_windows - 1) * h
    if compat == "release":
        s = int(d * cfg.sample_rate)
        s_h = (s // 4) * 3
        prompt_frames, prompt_start = o // 2, t_w - o // 2
        target = int(num_codes / cfg.token_rate * cfg.sample_rate)
    else:
        spt = cfg.samples_per_token
        s, s_h = w * spt, h * spt
        prompt_frames = min(cfg.prompt_frames, 2 * o)
        prompt_start = 2 * h
        target = num_codes * spt if num_samples is None else num_samples
    return WindowPlan(w, h, o, prompt_frames, prompt_start, t_w, padded, num_windows, s, s_h, s - s_h,
                      target, crashes=last_len < w)


def tile_codes(codes: np.ndarray, length: int) -> np.ndarray:
    """Periodic extension along the last axis: ``out[..., j] = codes[..., j mod T]``."""
    return codes[..., np.arange(length) % codes.shape[-1]]


def window_codes(codes: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """``(Q, T)`` codes -> ``(K, Q, W)`` windows of the tiled sequence."""
    if plan.crashes:
        raise ValueError(f"the reference crashes on {codes.shape[-1]} code frames (defect B3); "
                         "use compat='default'")
    padded = tile_codes(codes, plan.padded_len)
    return np.stack([padded[:, k * plan.hop: k * plan.hop + plan.window] for k in range(plan.num_windows)])


def cross_fade(windows: list[np.ndarray], plan: WindowPlan, compat: Compat = "default") -> np.ndarray:
    """Overlap-add decoded windows ``[(S',) ...]`` with a linear cross-fade; returns ``(target_len,)``.

    Release mode evaluates the fade in float64 (``np.linspace``) and stores float32, as the reference.
    """
    s, s_o = plan.wave_window, plan.wave_overlap
    out = np.asarray(windows[0][:s], np.float32)
    ramp = np.linspace(0.0, 1.0, s_o)
    if compat != "release":
        ramp = ramp.astype(np.float32)
    for wav in windows[1:]:
        wav = np.asarray(wav[:s], np.float32)
        head = (out[-s_o:] * (1 - ramp) + wav[:s_o] * ramp).astype(np.float32)
        out = np.concatenate([out[:-s_o], head, wav[s_o:]])
    if out.shape[0] < plan.target_len:
        raise ValueError(f"decoded {out.shape[0]} samples, fewer than the {plan.target_len} requested")
    return out[: plan.target_len]
