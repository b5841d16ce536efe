"""The public API: ``ALMTokenizer2`` encodes audio to codes and decodes codes to audio.

>>> tok = ALMTokenizer2.load("checkpoints/almtokenizer2")       # written by convert_torch_weights.py
>>> codes = tok.encode(wav, sample_rate)                        # (8, T) int, 12.5 frames per second
>>> audio = tok.decode(codes, steps=50, guidance=1.5, seed=0)   # (N,) float32 at 24 kHz

Long audio goes through :mod:`almtok_jax.pipeline` (12 s segments / windows, in-context continuation,
cross-fade). ``compat="release"`` reproduces the reference ``infer.py`` exactly; the default mode fixes its
defects (see the README). Independent segments and clips are batched together; the networks are compiled
once per batch-size bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.audio import AudioError, resample
from almtok_jax.compat import check_compat
from almtok_jax.config import ALMTokenizer2Config, from_dict
from almtok_jax.model import decode_latents, encode_segments, generate_latents, merge_variables
from almtok_jax.pipeline import (
    Compat,
    PipelineConfig,
    WindowPlan,
    cross_fade,
    num_tokens,
    plan_windows,
    segment_audio,
    window_codes,
)

TOKEN_OFFSET = 10000  # the reference's per-codebook offset in tokenize2 (not the codebook size)


def _bucket(n: int, cap: int) -> int:
    """Batch size to compile for ``n`` items: the next power of two, at most ``cap`` (then chunks of cap)."""
    size = 1
    while size < min(n, cap):
        size *= 2
    return min(size, cap)


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)]) if x.shape[0] < size else x


def flatten(codes: np.ndarray, offset: int = TOKEN_OFFSET) -> np.ndarray:
    """``(Q, T)`` codes -> ``(T*Q,)`` tokens, frame-major, codebook ``q`` shifted by ``q * offset``."""
    codes = np.asarray(codes)
    return (codes + offset * np.arange(codes.shape[0])[:, None]).T.reshape(-1)


def unflatten(tokens: np.ndarray, num_codebooks: int, offset: int = TOKEN_OFFSET) -> np.ndarray:
    """Inverse of :func:`flatten`: ``(T*Q,)`` tokens -> ``(Q, T)`` codes."""
    tokens = np.asarray(tokens)
    if tokens.size % num_codebooks:
        raise ValueError(f"{tokens.size} tokens are not a whole number of {num_codebooks}-codebook frames")
    return (tokens.reshape(-1, num_codebooks).T - offset * np.arange(num_codebooks)[:, None]).astype(np.int64)


class ALMTokenizer2:
    """Encoder/decoder around converted weights. ``variables`` maps component names to their variables."""

    def __init__(self, variables: dict, config: ALMTokenizer2Config, compat: Compat = "default"):
        check_compat(compat)
        self.variables = variables
        self.config = config
        self.compat = compat

    # ------------------------------------------------------------------ construction and properties

    @classmethod
    def load(cls, checkpoint_dir: str | Path, compat: Compat = "default") -> ALMTokenizer2:
        """Load a model directory written by ``convert_torch_weights.py`` or ``train.py --export``."""
        from almtok_jax.train.checkpoint import load_model_dir, to_device

        tree, config = load_model_dir(checkpoint_dir)
        variables = to_device(merge_variables(tree))
        return cls(variables, from_dict(ALMTokenizer2Config, config, where=f"{checkpoint_dir}/config.yaml"), compat)

    @property
    def pipeline(self) -> PipelineConfig:
        return self.config.pipeline

    @property
    def sample_rate(self) -> int:
        return self.pipeline.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.pipeline.token_rate

    @property
    def num_codebooks(self) -> int:
        return self.config.quantizer.rvq.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.rvq.codebook_size

    @property
    def vocab_size(self) -> int:
        """Size of the flat token space of :meth:`flatten` with the default offset."""
        return (self.num_codebooks - 1) * TOKEN_OFFSET + self.codebook_size

    @property
    def bitrate(self) -> float:
        return self.frame_rate * self.num_codebooks * float(np.log2(self.codebook_size))

    def flatten(self, codes: np.ndarray, offset: int = TOKEN_OFFSET) -> np.ndarray:
        return flatten(codes, offset)

    def unflatten(self, tokens: np.ndarray, offset: int = TOKEN_OFFSET) -> np.ndarray:
        return unflatten(tokens, self.num_codebooks, offset)

    # ------------------------------------------------------------------------------------- encoding

    def to_model_rate(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """``(N,)`` or ``(C, N)`` audio at ``sample_rate`` -> float32 at 24 kHz (same leading shape)."""
        wav = np.asarray(wav, np.float32)
        if wav.shape[-1] == 0:
            raise AudioError("empty audio: no samples to encode")
        if not np.all(np.isfinite(wav)):
            raise AudioError("audio contains NaN or infinite samples")
        if sample_rate != self.sample_rate:
            wav = np.asarray(resample(jnp.asarray(wav), int(sample_rate), self.sample_rate))
        return wav

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Mono 24 kHz clips -> per clip ``codes (Q, T)`` plus the per-segment ``features``, ``query`` and
        ``indices``. All segments of all clips are encoded together in batches."""
        segments = [segment_audio(np.asarray(c, np.float32), self.pipeline, self.compat) for c in clips]
        flat = np.concatenate(segments)
        cap = self.pipeline.encode_batch_size
        outs: dict[str, list[np.ndarray]] = {"codes": [], "features": [], "query": []}
        for start in range(0, len(flat), cap):
            chunk = flat[start: start + cap]
            out = encode_segments(self.variables, _pad_batch(chunk, _bucket(len(chunk), cap)), self.config,
                                  self.compat)
            for k in outs:
                outs[k].append(np.asarray(out[k])[: len(chunk)])
        stacked = {k: np.concatenate(v) for k, v in outs.items()}
        results, first = [], 0
        for clip, seg in zip(clips, segments, strict=True):
            part = {k: v[first: first + len(seg)] for k, v in stacked.items()}
            first += len(seg)
            n_tok = num_tokens(len(clip), self.pipeline, self.compat)
            codes = part["codes"].reshape(-1, self.num_codebooks)[:n_tok].T.astype(np.int64)
            results.append({"codes": codes, "indices": part.pop("codes").astype(np.int64), **part})
        return results

    def encode(self, wav: np.ndarray, sample_rate: int, channels: str = "mix") -> np.ndarray:
        """One clip ``(N,)`` or ``(C, N)`` -> codes ``(Q, T)``; ``channels="separate"`` gives ``(C, Q, T)``."""
        wav = np.asarray(wav, np.float32)
        if channels not in ("mix", "separate"):
            raise ValueError(f"channels must be 'mix' or 'separate', got {channels!r}")
        if wav.ndim == 2 and channels == "separate":
            wav = self.to_model_rate(wav, sample_rate)
            return np.stack([r["codes"] for r in self.encode_clips(list(wav))])
        if wav.ndim == 2:
            wav = wav.mean(axis=0)
        if wav.ndim != 1:
            raise AudioError(f"expected (N,) or (channels, N) audio, got shape {wav.shape}")
        return self.encode_clips([self.to_model_rate(wav, sample_rate)])[0]["codes"]

    def encode_batch(self, wavs: Sequence[np.ndarray], sample_rates: Sequence[int] | int) -> list[np.ndarray]:
        """Several mono clips (any lengths and rates) -> list of codes ``(Q, T_i)``, batched together."""
        rates = [sample_rates] * len(wavs) if isinstance(sample_rates, int) else list(sample_rates)
        clips = [self.to_model_rate(np.asarray(w, np.float32).reshape(-1), r) for w, r in zip(wavs, rates, strict=True)]
        return [r["codes"] for r in self.encode_clips(clips)]

    # ------------------------------------------------------------------------------------- decoding

    def _prompt(self, previous: np.ndarray, plan: WindowPlan) -> np.ndarray:
        """In-context prompt for the next window: previous latents ``[start, start + L)`` at ``[0, L)``."""
        prompt = np.zeros_like(previous)
        prompt[:, : plan.prompt_frames] = previous[:, plan.prompt_start: plan.prompt_start + plan.prompt_frames]
        return prompt

    def decode_clips(self, codes: Sequence[np.ndarray], steps: int | None = None, guidance: float | None = None,
                     seed: int = 0, noise: Sequence[np.ndarray | None] | None = None,
                     lengths: Sequence[int | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Codes ``[(Q, T_i)]`` -> per clip ``wave (N_i,)`` plus ``latents (K, T_w, C)``, ``prompts``,
        ``window_codes``, ``padded_codes`` and the plan. Window k of every clip is sampled in one batch
        (windows of one clip are sequential: each continues from the previous one).

        ``noise[i]`` (optional) is the initial ODE state of every window of clip i, ``(K, T_w, C)``;
        otherwise it is drawn from ``seed``. ``lengths[i]`` (default mode) trims clip i's output.
        """
        sampler = replace(self.config.sampler, num_steps=steps or self.config.sampler.num_steps,
                          guidance_scale=self.config.sampler.guidance_scale if guidance is None else guidance)
        n = len(codes)
        lengths = list(lengths) if lengths is not None else [None] * n
        noise = list(noise) if noise is not None else [None] * n
        plans = [plan_windows(c.shape[-1], self.pipeline, self.compat, lengths[i]) for i, c in enumerate(codes)]
        windows = [window_codes(np.asarray(c), p) for c, p in zip(codes, plans, strict=True)]
        frames, channels = plans[0].latent_frames, self.config.dit.out_channels
        key = jax.random.PRNGKey(seed)
        x0 = [np.asarray(noise[i], np.float32) if noise[i] is not None else
              np.asarray(jax.random.normal(jax.random.fold_in(key, i), (p.num_windows, frames, channels)))
              for i, p in enumerate(plans)]
        for i, p in enumerate(plans):
            if x0[i].shape != (p.num_windows, frames, channels):
                raise ValueError(f"noise for clip {i} must be {(p.num_windows, frames, channels)}, got {x0[i].shape}")
        latents: list[list[np.ndarray]] = [[] for _ in range(n)]
        prompts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for k in range(max(p.num_windows for p in plans)):
            active = [i for i in range(n) if k < plans[i].num_windows]
            prompt = np.stack([self._prompt(latents[i][-1][None], plans[i])[0] if k else
                               np.zeros((frames, channels), np.float32) for i in active])
            prompt_len = np.array([plans[i].prompt_frames if k else 0 for i in active], np.int32)
            size = _bucket(len(active), max(n, 1))
            out = generate_latents(self.variables, _pad_batch(np.stack([windows[i][k].T for i in active]), size),
                                   _pad_batch(prompt, size), _pad_batch(prompt_len, size),
                                   _pad_batch(np.stack([x0[i][k] for i in active]), size), self.config, sampler)
            for j, i in enumerate(active):
                latents[i].append(np.asarray(out[j]))
                if k:
                    prompts[i].append(prompt[j, : plans[i].prompt_frames])
        results = []
        for i, p in enumerate(plans):
            lat = np.stack(latents[i])
            wavs, wave = self.render(lat, p)
            results.append({"wave": wave, "latents": lat, "window_wavs": wavs,
                            "prompts": np.stack(prompts[i]) if prompts[i] else np.zeros((0, 0, channels), np.float32),
                            "window_codes": windows[i], "plan": p})
        return results

    def render(self, latents: np.ndarray, plan: WindowPlan) -> tuple[np.ndarray, np.ndarray]:
        """Window latents ``(K, T_w, C)`` -> SQ-decoded windows ``(K, S)`` and their cross-fade ``(N,)``."""
        wavs = np.asarray(decode_latents(self.variables, jnp.asarray(latents), self.config))[:, : plan.wave_window]
        return wavs, cross_fade(list(wavs), plan, self.compat)

    def decode(self, codes: np.ndarray, steps: int | None = None, guidance: float | None = None, seed: int = 0,
               noise: np.ndarray | None = None, length: int | None = None) -> np.ndarray:
        """Codes ``(Q, T)`` -> ``(N,)`` float32 audio at 24 kHz (``length`` trims it, default mode)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must be ({self.num_codebooks}, T), got shape {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return self.decode_clips([codes], steps, guidance, seed, [noise], [length])[0]["wave"]
