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

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.audio import AudioError, resample, resampled_length
from almtok_jax.compat import Compat, check_compat
from almtok_jax.config import ALMTokenizer2Config
from almtok_jax.flow.cfm import RELEASE_SAMPLER, SamplerConfig
from almtok_jax.model import decode_latents, encode_segments, generate_latents
from almtok_jax.pipeline import (
    PipelineConfig,
    WindowPlan,
    cross_fade,
    num_tokens,
    plan_windows,
    segment_audio,
    window_codes,
)
from almtok_jax.weights.model_dir import load_model, to_device

# Called as ``progress(stage, done, total)`` while one call works through its 12 s segments ("encoding
# segment") or windows ("decoding window"), so a command can show progress inside a long file.
WindowProgress = Callable[[str, int, int], None]
TOKEN_OFFSET = 10000  # the reference's per-codebook offset in tokenize2 (not the codebook size)
MAX_AMPLITUDE = 1e6  # larger samples are refused: float32 features of such audio overflow (~1e19 and up)
# Longest code sequence one decode call accepts: 4 h at 12.5 Hz. Every window's latents and waveform are
# held until the cross-fade (about 1.3 MB per 9 s of audio at full size), so the limit bounds memory (~2 GB).
MAX_DECODE_FRAMES = 180_000


def clip_fingerprint(codes: np.ndarray) -> int:
    """A stable 31-bit hash of a clip's codes (values and shape), independent of platform and process."""
    codes = np.ascontiguousarray(np.asarray(codes), dtype="<i8")
    digest = hashlib.blake2b(repr(codes.shape).encode() + codes.tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


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


def check_codes(codes: np.ndarray, num_codebooks: int, codebook_size: int, where: str = "codes") -> np.ndarray:
    """``codes`` as an array after checking it is an integer ``(num_codebooks, T)`` array, ``T >= 1``, with every
    value in ``[0, codebook_size)``. The range is checked on the values as given, before any narrowing, so a
    code beyond int32 (``c + 2**40``) cannot wrap back into range. ``where`` names the source in the error."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != num_codebooks or codes.dtype.kind not in "iu":  # no timedelta64
        raise ValueError(f"{where}: codes must be an integer array of shape ({num_codebooks}, T), "
                         f"got {codes.dtype} {codes.shape}")
    if codes.shape[1] == 0:
        raise ValueError(f"{where}: codes hold no frames (shape {codes.shape})")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"{where}: codes must lie in [0, {codebook_size}), got values from {codes.min()} "
                         f"to {codes.max()}")
    return codes


class ALMTokenizer2:
    """Encoder/decoder around converted weights. ``variables`` maps component names to their variables."""

    def __init__(self, variables: dict, config: ALMTokenizer2Config, compat: Compat = "default"):
        check_compat(compat)
        self.variables = variables
        self.config = config
        self.compat = compat
        # Sampler overrides used when a decode call gives none (``from_pretrained(steps=..., solver=...)``).
        self.sampler_defaults: dict[str, int | float | str | None] = {}

    # ------------------------------------------------------------------ construction and properties

    @classmethod
    def load(cls, checkpoint_dir: str | Path, compat: Compat = "default") -> ALMTokenizer2:
        """Load a model directory written by ``convert_torch_weights.py`` or ``train.py --export``; its
        config is checked against its weights and itself (:func:`~almtok_jax.weights.model_dir.load_model`)."""
        variables, config = load_model(checkpoint_dir)
        return cls(to_device(variables), config, compat)

    @classmethod
    def from_pretrained(cls, name: str | Path, revision: str | None = None, compat: Compat = "default",
                        steps: int | None = None, guidance: float | None = None, solver: str | None = None,
                        cache_dir: str | Path | None = None, checkpoint_file: str | None = None) -> ALMTokenizer2:
        """A model-hub repo id (``"Dongchao/almtokenizer2"``, at ``revision``), a release folder or a model
        directory, in one call: a release is downloaded (only the files read), converted once into the cache
        and loaded from there on later calls, offline included (:mod:`almtok_jax.weights.hub`). ``steps``,
        ``guidance`` and ``solver`` become the tokenizer's sampler (:meth:`sampler_config`); a cache entry
        whose weights cannot be read is rebuilt once."""
        from almtok_jax.weights.hub import is_cache_entry, resolve_model_dir
        from almtok_jax.weights.model_dir import ModelDirError

        where = dict(revision=revision, checkpoint_file=checkpoint_file, cache_dir=cache_dir)
        directory = resolve_model_dir(name, **where)
        try:
            tok = cls.load(directory, compat)
        except ModelDirError:
            if not is_cache_entry(directory):
                raise
            tok = cls.load(resolve_model_dir(name, **where, rebuild=True), compat)
        tok.sampler_config(steps, guidance, solver)  # refused here, not at the first decode
        tok.sampler_defaults = {"steps": steps, "guidance": guidance, "solver": solver}
        return tok

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
        peak = float(np.max(np.abs(wav)))
        if peak > MAX_AMPLITUDE:  # its power is not finite in float32: every feature NaN, every code 0
            raise AudioError(f"audio peak {peak:.3g} exceeds {MAX_AMPLITUDE:g}: not an audio signal (samples are "
                             "expected within about [-1, 1])")
        if sample_rate != self.sample_rate:
            # Zero-padded to whole seconds (the resampler pads with zeros anyway, so the kept samples are
            # unchanged): one compilation per duration in seconds, not per file length.
            n, rate = wav.shape[-1], int(sample_rate)
            padded = np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, -n % rate)])
            wav = np.asarray(resample(jnp.asarray(padded), rate, self.sample_rate))
            wav = wav[..., :resampled_length(n, rate, self.sample_rate)]
        return wav

    def encode_clips(self, clips: Sequence[np.ndarray], progress: WindowProgress | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Mono 24 kHz clips -> per clip ``codes (Q, T)`` plus the per-segment ``features``, ``query`` and
        ``indices``. All segments of all clips are encoded together in batches; ``progress`` is told after
        each batch."""
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
            if progress is not None:
                progress("encoding segment", start + len(chunk), len(flat))
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

    def encode_batch(self, wavs: Sequence[np.ndarray], sample_rates: Sequence[int] | int,
                     progress: WindowProgress | None = None) -> list[np.ndarray]:
        """Several mono clips (any lengths and rates) -> list of codes ``(Q, T_i)``, batched together."""
        rates = [sample_rates] * len(wavs) if isinstance(sample_rates, int) else list(sample_rates)
        clips = [self.to_model_rate(np.asarray(w, np.float32).reshape(-1), r) for w, r in zip(wavs, rates, strict=True)]
        return [r["codes"] for r in self.encode_clips(clips, progress)]

    # ------------------------------------------------------------------------------------- decoding

    def sampler_config(self, steps: int | None = None, guidance: float | None = None,
                       solver: str | None = None) -> SamplerConfig:
        """The sampler a decode runs: the model config's (default mode) with the given overrides.

        Release mode runs the reference's sampler whatever the config says (:data:`RELEASE_SAMPLER`: Euler on
        the uniform grid, 50 steps unless ``steps`` is given); another solver is refused there. An argument
        left ``None`` takes the tokenizer's :attr:`sampler_defaults` (``from_pretrained``'s options).
        """
        given = {"steps": steps, "guidance": guidance, "solver": solver}
        steps, guidance, solver = (v if v is not None else self.sampler_defaults.get(k) for k, v in given.items())
        if self.compat == "release":
            if solver not in (None, RELEASE_SAMPLER.solver):
                raise ValueError(f"release mode runs the reference's {RELEASE_SAMPLER.solver} sampler; "
                                 f"solver {solver!r} needs compat='default'")
            base = replace(RELEASE_SAMPLER, guidance_scale=self.config.sampler.guidance_scale)
        else:
            base = self.config.sampler
        if guidance is not None and not math.isfinite(guidance):
            raise ValueError(f"guidance {guidance}: the guidance scale must be a finite number")
        if base.guidance == "baked" and guidance not in (None, base.guidance_scale):
            raise ValueError(f"guidance {guidance}: this model's flow decoder has guidance scale "
                             f"{base.guidance_scale} baked in (a distilled student); it cannot sample at another")
        if solver == "shortcut" and not self.config.dit.step_embedding:
            raise ValueError("solver 'shortcut' needs a distilled few-step flow decoder (dit.step_embedding); "
                             "this model's decoder is not one")
        overrides = {k: v for k, v in (("num_steps", steps), ("guidance_scale", guidance), ("solver", solver))
                     if v is not None}
        return replace(base, **overrides)

    def window_noise(self, codes: np.ndarray, plan: WindowPlan, seed: int) -> np.ndarray:
        """Initial ODE states ``(K, T_w, C)`` of one clip's windows, a function of the seed, the clip's codes
        and the window index only, so a clip decodes the same alone or beside any other clips."""
        key = jax.random.fold_in(jax.random.PRNGKey(seed), clip_fingerprint(codes))
        shape = (plan.latent_frames, self.config.dit.out_channels)
        return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, k), shape))
                         for k in range(plan.num_windows)])

    def _plan(self, codes: np.ndarray, length: int | None) -> WindowPlan:
        if codes.shape[-1] > MAX_DECODE_FRAMES:
            raise ValueError(
                f"{codes.shape[-1]} code frames ({codes.shape[-1] / self.frame_rate / 3600:.1f} h) exceed the "
                f"decoding limit of {MAX_DECODE_FRAMES} frames ({MAX_DECODE_FRAMES / self.frame_rate / 60:.0f} "
                f"min): split the codes into pieces of at most {MAX_DECODE_FRAMES} frames "
                f"(codes[:, i:i + {MAX_DECODE_FRAMES}]) and decode each")
        return plan_windows(codes.shape[-1], self.pipeline, self.compat, length)

    def _initial_states(self, codes: Sequence[np.ndarray], plans: Sequence[WindowPlan],
                        noise: Sequence[np.ndarray | None], seed: int) -> list[np.ndarray]:
        """Per clip ``(K, T_w, C)``: the given ``noise[i]`` (shape-checked) or :meth:`window_noise`."""
        states = []
        for i, (c, p, x0) in enumerate(zip(codes, plans, noise, strict=True)):
            want = (p.num_windows, p.latent_frames, self.config.dit.out_channels)
            x0 = self.window_noise(c, p, seed) if x0 is None else np.asarray(x0, np.float32)
            if x0.shape != want:
                raise ValueError(f"noise for clip {i} must be {want}, got {x0.shape}")
            states.append(x0)
        return states

    def _window_prompt(self, previous: np.ndarray | None, plan: WindowPlan) -> tuple[np.ndarray, int]:
        """In-context prompt ``(T_w, C)`` and its length for the next window of a clip: the previous
        window's latents ``[start, start + L)`` at ``[0, L)``; nothing for a clip's first window."""
        if previous is None:
            return np.zeros((plan.latent_frames, self.config.dit.out_channels), np.float32), 0
        prompt = np.zeros_like(previous)
        prompt[: plan.prompt_frames] = previous[plan.prompt_start: plan.prompt_start + plan.prompt_frames]
        return prompt, plan.prompt_frames

    def _sample_windows(self, codes: np.ndarray, prompt: np.ndarray, prompt_len: np.ndarray, x0: np.ndarray,
                        sampler: SamplerConfig, bucket_cap: int) -> np.ndarray:
        """One window of several clips in one batch (padded to a compiled bucket size) -> latents
        ``(B, T_w, C)``. ``codes (B, W, Q)``, ``prompt``/``x0 (B, T_w, C)``, ``prompt_len (B,)``."""
        size = _bucket(len(codes), bucket_cap)
        out = generate_latents(self.variables, *(_pad_batch(a, size) for a in (codes, prompt, prompt_len, x0)),
                               self.config, sampler)
        return np.asarray(out)[: len(codes)]

    def decode_clips(self, codes: Sequence[np.ndarray], steps: int | None = None, guidance: float | None = None,
                     seed: int = 0, noise: Sequence[np.ndarray | None] | None = None,
                     lengths: Sequence[int | None] | None = None, solver: str | None = None,
                     progress: WindowProgress | None = None) -> list[dict[str, np.ndarray]]:
        """Codes ``[(Q, T_i)]`` -> per clip ``wave (N_i,)`` plus ``latents (K, T_w, C)``, ``prompts``,
        ``window_codes``, ``padded_codes`` and the plan. Window k of every clip is sampled in one batch
        (windows of one clip are sequential: each continues from the previous one).

        ``noise[i]`` (optional) is the initial ODE state of every window of clip i, ``(K, T_w, C)``;
        otherwise it is drawn from ``seed`` and the clip's codes (:meth:`window_noise`). ``lengths[i]``
        (default mode) trims clip i's output. ``steps``/``guidance``/``solver`` override the sampler
        (:meth:`sampler_config`). Inputs longer than :data:`MAX_DECODE_FRAMES` are refused. ``progress`` is
        told after each window step.
        """
        codes = [check_codes(c, self.num_codebooks, self.codebook_size, f"clip {i}") for i, c in enumerate(codes)]
        sampler = self.sampler_config(steps, guidance, solver)
        n = len(codes)
        lengths = list(lengths) if lengths is not None else [None] * n
        plans = [self._plan(c, length) for c, length in zip(codes, lengths, strict=True)]
        windows = [window_codes(c, p) for c, p in zip(codes, plans, strict=True)]
        x0 = self._initial_states(codes, plans, list(noise) if noise is not None else [None] * n, seed)
        latents: list[list[np.ndarray]] = [[] for _ in range(n)]
        prompts: list[list[np.ndarray]] = [[] for _ in range(n)]
        num_windows = max(p.num_windows for p in plans)
        for k in range(num_windows):
            active = [i for i in range(n) if k < plans[i].num_windows]
            prompt, prompt_len = zip(*(self._window_prompt(latents[i][-1] if k else None, plans[i])
                                       for i in active), strict=True)
            out = self._sample_windows(np.stack([windows[i][k].T for i in active]), np.stack(prompt),
                                       np.array(prompt_len, np.int32), np.stack([x0[i][k] for i in active]),
                                       sampler, max(n, 1))
            for j, i in enumerate(active):
                latents[i].append(out[j])
                if k:
                    prompts[i].append(prompt[j][: plans[i].prompt_frames])
            if progress is not None:
                progress("decoding window", k + 1, num_windows)
        return [self._clip_result(np.stack(latents[i]), prompts[i], windows[i], plans[i]) for i in range(n)]

    def _clip_result(self, latents: np.ndarray, prompts: list[np.ndarray], windows: np.ndarray,
                     plan: WindowPlan) -> dict:
        wavs, wave = self.render(latents, plan)
        channels = self.config.dit.out_channels
        return {"wave": wave, "latents": latents, "window_wavs": wavs,
                "prompts": np.stack(prompts) if prompts else np.zeros((0, 0, channels), np.float32),
                "window_codes": windows, "plan": plan}

    def render(self, latents: np.ndarray, plan: WindowPlan) -> tuple[np.ndarray, np.ndarray]:
        """Window latents ``(K, T_w, C)`` -> SQ-decoded windows ``(K, S)`` and their cross-fade ``(N,)``."""
        wavs = np.asarray(decode_latents(self.variables, jnp.asarray(latents), self.config))[:, : plan.wave_window]
        return wavs, cross_fade(list(wavs), plan, self.compat)

    def decode(self, codes: np.ndarray, steps: int | None = None, guidance: float | None = None, seed: int = 0,
               noise: np.ndarray | None = None, length: int | None = None, solver: str | None = None) -> np.ndarray:
        """Codes ``(Q, T)`` -> ``(N,)`` float32 audio at 24 kHz (``length`` trims it, default mode)."""
        return self.decode_clips([codes], steps, guidance, seed, [noise], [length], solver)[0]["wave"]
