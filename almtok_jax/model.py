"""The assembled ALMTokenizer2: 24 kHz segments -> codes -> condition -> latents -> 24 kHz audio.

Variables are one dict per component, in the order of the model picture (:data:`COMPONENTS`; each
component's build, shapes, checkpoint keys and loading live at the bottom of its own module, see
:mod:`almtok_jax.component`)::

    whisper, wavlm, musicfm   frozen experts
    fusion                    expert glue -> 25 Hz features
    quantizer                 queries, RVQ, query decoder, pronunciation decoder
    gpt                       GPT code predictor (training only, when quantizer.gpt_loss is enabled)
    flow                      DiT estimator + zero condition
    sqcodec                   frozen SQ codec (from sqcodec.pth)

Reading a release, converting it and model directories are the weights layer's (:mod:`almtok_jax.weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp

from almtok_jax.audio import resample, whisper_log_mel
from almtok_jax.compat import Compat
from almtok_jax.component import Component
from almtok_jax.config import ALMTokenizer2Config
from almtok_jax.experts.fusion import FUSION, ExpertFusion
from almtok_jax.experts.musicfm import MUSICFM, MusicFM
from almtok_jax.experts.wavlm import WAVLM, WavLMExpert, resample_kernel
from almtok_jax.experts.whisper import WHISPER, WhisperEncoder, whisper_feature
from almtok_jax.flow.cfm import (
    FLOW,
    SamplerConfig,
    estimator_variables,
    fill_padding,
    incontext_latents,
    inference_masks,
    sample,
    zero_condition,
)
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.quantizer.gpt import GPT
from almtok_jax.quantizer.query import QUANTIZER, QueryQuantizer
from almtok_jax.sqcodec import SQCODEC, sq_decode

Array = jax.Array

COMPONENTS: tuple[Component, ...] = (WHISPER, WAVLM, MUSICFM, FUSION, QUANTIZER, GPT, FLOW, SQCODEC)
FROZEN = tuple(c.name for c in COMPONENTS if c.frozen)


def components(config: ALMTokenizer2Config, names: tuple[str, ...] | None = None) -> tuple[Component, ...]:
    """The components ``config`` builds (optionally only ``names``), in the order of the model picture."""
    return tuple(c for c in COMPONENTS if c.enabled(config) and (names is None or c.name in names))


def abstract_variables(config: ALMTokenizer2Config, names: tuple[str, ...] | None = None) -> dict[str, dict]:
    """``jax.ShapeDtypeStruct`` trees of every component's variables."""
    return {c.name: c.abstract_variables(c.config(config)) for c in components(config, names)}


def init_variables(config: ALMTokenizer2Config, key: Array, names: tuple[str, ...] | None = None) -> dict:
    """Fresh variables of the components (all, or ``names``) from the modules' own initializers: what
    training starts from. Jit it: the dummy forward passes of the inits are then dead code."""
    return {c.name: c.init(c.config(config), jax.random.fold_in(key, i))
            for i, c in enumerate(components(config)) if names is None or c.name in names}


# ---------------------------------------------------------------------------------------------- encode


def expert_streams(variables: Mapping, segments: Array, config: ALMTokenizer2Config) -> tuple[Array, ...]:
    """The frozen experts on segments ``(B, N)`` at 24 kHz: ``(whisper (B, n_len, Dw), wavlm (B, T_w, Dl),
    acoustic, semantic (B, T_b, Db))`` (50, 50, 25, 25 Hz), without gradients."""
    e = config.experts
    rate = e.wavlm.input_sample_rate  # the segments' rate; the shared kernel is WavLM's resampler
    wav16 = resample(segments, rate, e.logmel.sample_rate, kernel=resample_kernel(variables["wavlm"]))
    mel = whisper_log_mel(wav16, e.logmel)
    whisper = whisper_feature(WhisperEncoder(e.whisper).apply(variables["whisper"], mel), segments.shape[-1], rate)
    wavlm = WavLMExpert(e.wavlm).apply(variables["wavlm"], segments)
    acoustic, semantic = MusicFM(e.musicfm).apply(variables["musicfm"], segments)
    return jax.lax.stop_gradient((whisper, wavlm, acoustic, semantic))


def fused_features(variables: Mapping, streams: tuple[Array, ...], config: ALMTokenizer2Config,
                   compat: Compat = "default") -> Array:
    """Expert streams (:func:`expert_streams`) -> fused 25 Hz features ``(B, T, codec_dim)``."""
    return ExpertFusion(config.fusion, compat).apply(variables["fusion"], *streams)


@partial(jax.jit, static_argnames=("config", "compat"))
def encode_segments(variables: Mapping, segments: Array, config: ALMTokenizer2Config,
                    compat: Compat = "default") -> dict[str, Array]:
    """``(B, N)`` 24 kHz segments -> ``codes (B, T/2, Q)`` int32 at 12.5 Hz, with ``features`` (25 Hz) and
    ``query`` (the RVQ input). One compilation per segment shape; the query encoder runs once."""
    features = fused_features(variables, expert_streams(variables, segments, config), config, compat)
    out = QueryQuantizer(config.quantizer, compat).apply(variables["quantizer"], features, method="encode")
    return {"codes": out["codes"], "features": features, "query": out["query"]}


# ---------------------------------------------------------------------------------------------- decode


def condition(variables: Mapping, codes: Array, config: ALMTokenizer2Config) -> Array:
    """Codes ``(B, W, Q)`` -> DiT condition ``(B, 2W, codec_dim)`` at 25 Hz."""
    return QueryQuantizer(config.quantizer).apply(variables["quantizer"], codes, method="dequantize")


@partial(jax.jit, static_argnames=("config", "sampler"))
def generate_latents(variables: Mapping, codes: Array, prompt: Array, prompt_len: Array, x0: Array,
                     config: ALMTokenizer2Config, sampler: SamplerConfig) -> Array:
    """One decoding window for a batch: codes ``(B, W, Q)`` + in-context ``prompt (B, T, C)`` (its first
    ``prompt_len`` frames are used) + initial noise ``x0 (B, T, C)`` -> SQ latents ``(B, T, C)``.

    The condition is computed one row at a time (it is cheap beside the sampler): with the whole batch at
    once XLA's kernels round differently per batch size (~2e-6), and a clip must decode the same alone or
    in any batch."""
    cond = jax.lax.map(lambda row: condition(variables, row[None], config)[0], codes)
    frames = x0.shape[1]
    masks = inference_masks(frames, jnp.full(prompt_len.shape, frames), prompt_len)
    mu = fill_padding(cond, masks, zero_condition(variables["flow"]))
    estimator = DiTEstimator(config.dit)
    est_vars = estimator_variables(variables["flow"])
    latents, _ = sample(lambda h, t, *step: estimator.apply(est_vars, h, t, *step), mu,
                        incontext_latents(prompt, masks), prompt_len, x0, sampler)
    return latents


@partial(jax.jit, static_argnames="config")
def decode_latents(variables: Mapping, latents: Array, config: ALMTokenizer2Config) -> Array:
    """SQ latents ``(B, T, C)`` (25 Hz) -> waveform ``(B, T * 960)`` at 24 kHz (quantized first)."""
    wav = sq_decode(variables["sqcodec"], latents, config.sqcodec)
    return wav[..., 0]
