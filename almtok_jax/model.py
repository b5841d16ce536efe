"""The assembled ALMTokenizer2: 24 kHz segments -> codes -> condition -> latents -> 24 kHz audio.

Variables are one dict per component, in the order of the model picture::

    whisper, wavlm, musicfm   frozen experts                 (reference prefixes whisper_encoder.,
    fusion                    expert glue -> 25 Hz features   wavlm_encoder. + wavlm_transfer.,
    quantizer                 queries, RVQ, query decoder     pretrained_model.model.model., ...)
    flow                      DiT estimator + zero condition
    sqcodec                   frozen SQ codec (from sqcodec.pth)

:data:`FROZEN` components are never trained. :func:`convert_checkpoint` maps the reference's two state
dicts onto this layout through each component's own rules, and reports every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.audio import resample, whisper_log_mel
from almtok_jax.config import ALMTokenizer2Config
from almtok_jax.experts.fusion import ExpertFusion, fusion_rules
from almtok_jax.experts.musicfm import CHECKPOINT_PREFIX as MUSICFM_PREFIX
from almtok_jax.experts.musicfm import MusicFM, musicfm_rules
from almtok_jax.experts.musicfm import variable_shapes as musicfm_shapes
from almtok_jax.experts.wavlm import WavLMExpert, min_input_samples, wavlm_expert_rules
from almtok_jax.experts.whisper import WhisperEncoder, whisper_feature, whisper_rules
from almtok_jax.flow.cfm import (
    SamplerConfig,
    cfm_rules,
    cfm_shapes,
    estimator_variables,
    fill_padding,
    incontext_latents,
    inference_masks,
    sample,
)
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.mapping import MappingError, Rule, canonical_key, convert_state_dict, prefixed
from almtok_jax.quantizer.query import QueryQuantizer, quantizer_rules
from almtok_jax.sqcodec import SQCodec, load_sqcodec

Array = jax.Array

FROZEN = ("whisper", "wavlm", "musicfm", "sqcodec")
TRAINABLE = ("fusion", "quantizer", "flow")
_KEY = jax.random.PRNGKey(0)


@dataclass(frozen=True)
class Component:
    """One part of the reference state dict: its rules (full key names) and its variable shapes."""

    name: str
    rules: Callable[[ALMTokenizer2Config], list[Rule]]
    shapes: Callable[[ALMTokenizer2Config], dict]


def _zeros(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _whisper_shapes(c: ALMTokenizer2Config) -> dict:
    w = c.experts.whisper
    return jax.eval_shape(WhisperEncoder(w).init, _KEY, _zeros(1, w.num_mel_frames, w.num_mel_bins))


def _wavlm_shapes(c: ALMTokenizer2Config) -> dict:
    return jax.eval_shape(WavLMExpert(c.experts.wavlm).init, _KEY, _zeros(1, min_input_samples(c.experts.wavlm)))


def _fusion_shapes(c: ALMTokenizer2Config) -> dict:
    f = c.fusion
    return jax.eval_shape(ExpertFusion(f).init, _KEY, _zeros(1, 2, f.whisper_dim), _zeros(1, 2, f.wavlm_dim),
                          _zeros(1, 1, f.bestrq_dim), _zeros(1, 1, f.bestrq_dim))


def _quantizer_shapes(c: ALMTokenizer2Config) -> dict:
    q = c.quantizer
    return jax.eval_shape(QueryQuantizer(q).init, _KEY, _zeros(1, 2 * q.interval, q.dim))


# Components of ep*.checkpoint['model'], in the order of the model picture.
MODEL_COMPONENTS = (
    Component("whisper", lambda c: prefixed("whisper_encoder.", whisper_rules(c.experts.whisper)), _whisper_shapes),
    Component("wavlm", lambda c: wavlm_expert_rules(c.experts.wavlm), _wavlm_shapes),
    Component("musicfm", lambda c: prefixed(MUSICFM_PREFIX, musicfm_rules(c.experts.musicfm)),
              lambda c: musicfm_shapes(c.experts.musicfm)),
    Component("fusion", lambda c: fusion_rules(c.fusion), _fusion_shapes),
    Component("quantizer", lambda c: quantizer_rules(c.quantizer), _quantizer_shapes),
    Component("flow", lambda c: cfm_rules(c.dit), lambda c: cfm_shapes(c.dit)),
)


def convert_components(model_state: Mapping[str, np.ndarray], codec_state: Mapping[str, np.ndarray],
                       config: ALMTokenizer2Config, source: str = "release") -> Iterator[tuple[str, dict]]:
    """Reference state dicts (``ep*.checkpoint['model']``, ``sqcodec.pth['codec_model']``) -> ``(component,
    variables)`` one component at a time (NumPy arrays), so that a caller can write and free each before
    the next is read (the state dicts may hold lazily read tensors: :func:`almtok_jax.torch_io.open_state_dict`).

    Every key goes to the first component whose rules match it; a key no component knows, a variable no
    key provides and every shape mismatch are collected over all components and raised together as one
    :class:`MappingError` naming ``source`` after the last component (the components that fitted have been
    yielded by then: a caller writes them to a temporary place).
    """
    rules = {comp.name: comp.rules(config) for comp in MODEL_COMPONENTS}
    parts: dict[str, dict[str, np.ndarray]] = {name: {} for name in rules}
    unknown = []
    for key, value in model_state.items():
        ckey = canonical_key(key)
        owner = next((name for name, rs in rules.items() if any(r.match(ckey) for r in rs)), None)
        if owner is None:
            unknown.append(f"{key} {tuple(np.shape(value))}")
        else:
            parts[owner][key] = value
    problems = []
    for comp in MODEL_COMPONENTS:
        try:
            variables = convert_state_dict(parts.pop(comp.name), rules[comp.name], comp.shapes(config),
                                           source=f"{source} [{comp.name}]")
        except MappingError as e:
            problems.append(str(e))
        else:
            yield comp.name, variables
            del variables
    try:
        variables = load_sqcodec(codec_state, config.sqcodec)
    except MappingError as e:
        problems.append(f"{source} [sqcodec]: {e}")
    else:
        yield "sqcodec", variables
    if unknown:
        problems.append(f"{source}: {len(unknown)} keys belong to no component:\n    " + "\n    ".join(unknown))
    if problems:
        raise MappingError("\n".join(problems))


def convert_checkpoint(model_state: Mapping[str, np.ndarray], codec_state: Mapping[str, np.ndarray],
                       config: ALMTokenizer2Config, source: str = "release") -> dict[str, dict]:
    """All of :func:`convert_components` at once, as device arrays (one component copied at a time)."""
    return {name: jax.tree.map(jnp.asarray, variables)
            for name, variables in convert_components(model_state, codec_state, config, source)}


def merge_variables(tree: Mapping) -> dict[str, dict]:
    """A model directory's tree (``frozen``, ``trainable`` and, from training, ``extra``) -> component
    variables; collections of one component spread over several parts are merged."""
    out: dict[str, dict] = {}
    for part in ("frozen", "trainable", "extra"):
        for component, collections in tree.get(part, {}).items():
            out.setdefault(component, {}).update(collections)
    return out


# ---------------------------------------------------------------------------------------------- encode


def resample_kernel(variables: Mapping) -> Array:
    """The checkpoint's 24k->16k kernel (``wavlm_transfer.kernel``), shared by Whisper and WavLM."""
    return variables["wavlm"]["buffers"]["wavlm_transfer"]["kernel"]


def expert_streams(variables: Mapping, segments: Array, config: ALMTokenizer2Config) -> tuple[Array, ...]:
    """The frozen experts on segments ``(B, N)`` at 24 kHz: ``(whisper (B, n_len, Dw), wavlm (B, T_w, Dl),
    acoustic, semantic (B, T_b, Db))`` (50, 50, 25, 25 Hz), without gradients."""
    e = config.experts
    wav16 = resample(segments, 24000, e.logmel.sample_rate, kernel=resample_kernel(variables))
    mel = whisper_log_mel(wav16, e.logmel)
    whisper = whisper_feature(WhisperEncoder(e.whisper).apply(variables["whisper"], mel), segments.shape[-1])
    wavlm = WavLMExpert(e.wavlm).apply(variables["wavlm"], segments)
    acoustic, semantic = MusicFM(e.musicfm).apply(variables["musicfm"], segments)
    return jax.lax.stop_gradient((whisper, wavlm, acoustic, semantic))


def fused_features(variables: Mapping, streams: tuple[Array, ...], config: ALMTokenizer2Config,
                   compat: str = "default") -> Array:
    """Expert streams (:func:`expert_streams`) -> fused 25 Hz features ``(B, T, codec_dim)``."""
    return ExpertFusion(config.fusion, compat).apply(variables["fusion"], *streams)


@partial(jax.jit, static_argnames=("config", "compat"))
def encode_segments(variables: Mapping, segments: Array, config: ALMTokenizer2Config,
                    compat: str = "default") -> dict[str, Array]:
    """``(B, N)`` 24 kHz segments -> ``codes (B, T/2, Q)`` int32 at 12.5 Hz, with ``features`` (25 Hz) and
    ``query`` (the RVQ input). One compilation per segment shape."""
    features = fused_features(variables, expert_streams(variables, segments, config), config, compat)
    quantizer = QueryQuantizer(config.quantizer)
    query = quantizer.apply(variables["quantizer"], features, method="encoder_sequence")["query"]
    codes, _ = quantizer.apply(variables["quantizer"], features, method="quantize")
    return {"codes": codes, "features": features, "query": query}


# ---------------------------------------------------------------------------------------------- decode


def condition(variables: Mapping, codes: Array, config: ALMTokenizer2Config) -> Array:
    """Codes ``(B, W, Q)`` -> DiT condition ``(B, 2W, codec_dim)`` at 25 Hz."""
    return QueryQuantizer(config.quantizer).apply(variables["quantizer"], codes, method="dequantize")


@partial(jax.jit, static_argnames=("config", "sampler"))
def generate_latents(variables: Mapping, codes: Array, prompt: Array, prompt_len: Array, x0: Array,
                     config: ALMTokenizer2Config, sampler: SamplerConfig) -> Array:
    """One decoding window for a batch: codes ``(B, W, Q)`` + in-context ``prompt (B, T, C)`` (its first
    ``prompt_len`` frames are used) + initial noise ``x0 (B, T, C)`` -> SQ latents ``(B, T, C)``."""
    cond = condition(variables, codes, config)
    frames = x0.shape[1]
    masks = inference_masks(frames, jnp.full(prompt_len.shape, frames), prompt_len)
    mu = fill_padding(cond, masks, variables["flow"]["params"]["zero_cond_embedding1"])
    estimator = DiTEstimator(config.dit)
    est_vars = estimator_variables(variables["flow"])
    latents, _ = sample(lambda h, t: estimator.apply(est_vars, h, t), mu, incontext_latents(prompt, masks),
                        prompt_len, x0, sampler)
    return latents


@partial(jax.jit, static_argnames="config")
def decode_latents(variables: Mapping, latents: Array, config: ALMTokenizer2Config) -> Array:
    """SQ latents ``(B, T, C)`` (25 Hz) -> waveform ``(B, T * 960)`` at 24 kHz (quantized first)."""
    wav = SQCodec(config.sqcodec).apply(variables["sqcodec"], latents, method=SQCodec.decode)
    return wav[..., 0]
