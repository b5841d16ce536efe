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

:func:`convert_checkpoint` routes every key of the reference's two state dicts to the one component whose
key prefix owns it; :func:`derive_config` reads the architecture of a release off its files and the
checkpoint's key names and shapes, each component deriving its own part; :func:`load_model` reads a
model directory and checks its config against its weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from almtok_jax.audio import resample, whisper_log_mel
from almtok_jax.compat import Compat
from almtok_jax.component import CODEC_STATE, MODEL_STATE, Component, DeriveError, ReleaseFiles
from almtok_jax.config import ALMTokenizer2Config, ConfigError, ModelDirError, model_config_from_dict
from almtok_jax.experts.fusion import FUSION, ExpertFusion
from almtok_jax.experts.musicfm import MUSICFM, MusicFM
from almtok_jax.experts.wavlm import WAVLM, WavLMExpert
from almtok_jax.experts.whisper import WHISPER, WhisperEncoder, whisper_feature
from almtok_jax.flow.cfm import (
    FLOW,
    SamplerConfig,
    estimator_variables,
    fill_padding,
    incontext_latents,
    inference_masks,
    sample,
)
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.mapping import MappingError
from almtok_jax.quantizer.gpt import GPT
from almtok_jax.quantizer.query import QUANTIZER, QueryQuantizer
from almtok_jax.sqcodec import SQCODEC, SQCodec

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


def absent_components(states: Mapping[str, Mapping], config: ALMTokenizer2Config, source: str) -> dict[str, str]:
    """Component name -> one line, for each converted component of which ``states`` (state-dict name ->
    state dict) holds no key (e.g. a checkpoint saved without its frozen experts), with the number of
    tensors it needs."""
    problems = {}
    for c in components(config):
        if c.source is not None and not any(c.owns(k) for k in states[c.source]):
            needed = len(jax.tree.leaves(c.abstract_variables(c.config(config))))
            where = c.key_prefix or ", ".join(f"{n}." for n in c.key_names or ())
            problems[c.name] = (f"{source}: component {c.name} is missing from {c.source}: none of the {needed} "
                                f"tensors it needs (keys under {where}) is there")
    return problems


def derive_config(model_state: Mapping, codec_state: Mapping, files: ReleaseFiles, source: str = "release",
                  base: ALMTokenizer2Config | None = None) -> ALMTokenizer2Config:
    """The architecture of a release: every component's ``derive`` over the keys it owns and the release
    ``files`` (see :mod:`almtok_jax.component`); what neither states stays as in ``base`` (default: the
    release architecture, the config defaults). Only names and shapes of the states are read.

    Raises :class:`DeriveError` for a missing component, keys that describe no buildable architecture, or
    component widths that do not chain (fusion output = quantizer width = DiT condition width).
    """
    config = base if base is not None else ALMTokenizer2Config()
    states = {MODEL_STATE: model_state, CODEC_STATE: codec_state}
    absent = absent_components(states, config, source)
    if absent:
        raise DeriveError("\n".join(absent.values()))
    for c in components(config):
        if c.source is not None:
            try:
                config = c.derived(config, states[c.source], files)
            except DeriveError:
                raise
            except ValueError as e:  # a config class refusing the derived numbers
                raise DeriveError(f"{source}: the keys of component {c.name} give no valid config: {e}") from None
    widths = {"fusion.codec_dim": config.fusion.codec_dim, "quantizer.dim": config.quantizer.dim,
              "dit.cond_dim": config.dit.cond_dim}
    if len(set(widths.values())) > 1:
        raise DeriveError(f"{source}: the component widths do not chain: {widths}")
    return config


def convert_checkpoint(model_state: Mapping[str, np.ndarray], codec_state: Mapping[str, np.ndarray],
                       config: ALMTokenizer2Config, source: str = "release", lazy: bool = False) -> dict[str, dict]:
    """Reference state dicts (``ep*.checkpoint['model']``, ``sqcodec.pth['codec_model']``) -> variables
    (state dicts of ``jax.ShapeDtypeStruct`` give the variables' shapes through the same rules).

    With ``lazy`` the variables are :class:`~almtok_jax.mapping.LazyVariable` leaves: everything is checked,
    but a value is read from the (lazily opened) state dicts only when its variable is read, one variable at a
    time, e.g. by :func:`~almtok_jax.train.checkpoint.save_model_dir` as it writes it.

    Every key goes to the one component whose key prefix owns it; a key no component owns, a component
    without any key (one line each), a variable no key provides and every shape mismatch are collected over
    all components and raised together as one :class:`MappingError` naming ``source``.
    """
    states = {MODEL_STATE: model_state, CODEC_STATE: codec_state}
    converted = [c for c in components(config) if c.source is not None]
    absent = absent_components(states, config, source)
    variables, problems = {}, list(absent.values())
    for state_name, state in states.items():
        owners = [c for c in converted if c.source == state_name]
        unowned = [f"{k} {tuple(np.shape(v))}" for k, v in state.items() if not any(c.owns(k) for c in owners)]
        if unowned:
            problems.append(f"{source}: {len(unowned)} keys of {state_name} belong to no component:\n    "
                            + "\n    ".join(unowned))
    for c in (c for c in converted if c.name not in absent):
        try:
            variables[c.name] = c.load(states[c.source], c.config(config), source=f"{source} [{c.name}]",
                                       lazy=lazy)
        except MappingError as e:
            problems.append(str(e))
    if problems:
        raise MappingError("\n".join(problems))
    if lazy:
        return variables
    return jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jnp.asarray(a), variables)


def split_variables(variables: Mapping) -> dict[str, dict]:
    """Component variables -> the model-directory layout ``{"frozen": {...}, "trainable": {...}}``."""
    return {"frozen": {k: v for k, v in variables.items() if k in FROZEN},
            "trainable": {k: v for k, v in variables.items() if k not in FROZEN}}


def merge_variables(tree: Mapping) -> dict[str, dict]:
    """A model directory's tree (``frozen``, ``trainable`` and, from training, ``extra``) -> component
    variables; collections of one component spread over several parts are merged."""
    out: dict[str, dict] = {}
    for part in ("frozen", "trainable", "extra"):
        for component, collections in tree.get(part, {}).items():
            out.setdefault(component, {}).update(collections)
    return out


# ------------------------------------------------------------------------------------- model directories


def variable_problems(variables: Mapping, config: ALMTokenizer2Config,
                      names: tuple[str, ...] | None = None) -> list[str]:
    """Every way ``variables`` (component -> collections) differ from what ``config`` builds: a missing or
    unknown component, a missing or unknown variable, a shape (stored, then config) that differs."""
    expected = abstract_variables(config, names)
    selected = {k: v for k, v in variables.items() if names is None or k in names}
    problems = [f"component {n}: not stored, but the config builds it" for n in expected if n not in selected]
    problems += [f"component {n}: stored, but the config does not build it" for n in selected if n not in expected]
    for name in (n for n in expected if n in selected):
        want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected[name]).items()}
        got = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(selected[name])).items()}
        problems += [f"component {name}: {p}: not stored" for p in sorted(set(want) - set(got))]
        problems += [f"component {name}: {p}: stored, but the config has no such variable"
                     for p in sorted(set(got) - set(want))]
        problems += [f"component {name}: {p}: stored shape {got[p]}, the config implies {want[p]}"
                     for p in sorted(set(want) & set(got)) if got[p] != want[p]]
    return problems


def pipeline_problems(config: ALMTokenizer2Config) -> list[str]:
    """Every pipeline number that contradicts what the model is built for (frame rates of the SQ codec and
    the quantizer; window arithmetic of spec 03 §6, B1 and B4; the DiT position table). That every part
    reads the same sample rate is checked by :class:`~almtok_jax.config.ALMTokenizer2Config` itself."""
    p, sq = config.pipeline, config.sqcodec
    problems = []
    latent_rate = sq.sample_rate / sq.hop_length
    if not math.isclose(p.latent_rate, latent_rate):
        problems.append(f"pipeline.latent_rate is {p.latent_rate} but the SQ codec gives {latent_rate} frames/s "
                        f"({sq.sample_rate} Hz / hop {sq.hop_length})")
    token_rate = latent_rate / config.quantizer.interval
    if not math.isclose(p.token_rate, token_rate):
        problems.append(f"pipeline.token_rate is {p.token_rate} but the quantizer gives {token_rate} tokens/s "
                        f"({latent_rate} frames/s / interval {config.quantizer.interval})")
    if problems:
        return problems  # the window numbers below are meaningless with the wrong rates
    window, frames = int(p.min_duration * p.token_rate), int(p.min_duration * p.latent_rate)
    if frames != 2 * window or window < 4:
        return [f"pipeline.min_duration {p.min_duration} s gives {window} tokens and {frames} latent frames per "
                "window; it must give at least 4 tokens and exactly twice as many frames (a multiple of 0.08 s)"]
    overlap = window - (window // 4) * 3
    if p.prompt_frames > 2 * overlap:
        problems.append(f"pipeline.prompt_frames {p.prompt_frames} is longer than the {2 * overlap} latent frames "
                        f"two windows of pipeline.min_duration {p.min_duration} s share (spec 03 §6.3 B1)")
    if frames > config.dit.num_positional_embeddings:
        problems.append(f"pipeline.min_duration {p.min_duration} s gives {frames} latent frames per window, more "
                        f"than dit.num_positional_embeddings {config.dit.num_positional_embeddings}")
    return problems


def _raise(directory: str | Path, what: str, problems: list[str]) -> None:
    if problems:
        raise ModelDirError(f"model directory {directory}: {what}:\n  " + "\n  ".join(problems))


def check_model(variables: Mapping, config: ALMTokenizer2Config, where: str | Path,
                names: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ModelDirError` naming ``where`` unless ``config`` fits ``variables`` (the
    components ``names``, default all) and its pipeline numbers fit the model."""
    _raise(where, "config.yaml does not match the stored weights", variable_problems(variables, config, names))
    _raise(where, "config.yaml pipeline does not match the model", pipeline_problems(config))


def load_model(directory: str | Path) -> tuple[dict, ALMTokenizer2Config]:
    """``(variables as NumPy, config)`` of a model directory (``convert_torch_weights.py`` or a training
    export), its config checked against its weights and itself (:func:`check_model`)."""
    from almtok_jax.train.checkpoint import load_model_dir  # orbax: only when a directory is read

    tree, raw = load_model_dir(directory)
    try:
        config = model_config_from_dict(raw, where="config.yaml")
    except ConfigError as e:
        raise ModelDirError(f"model directory {directory}: {e}") from None
    variables = merge_variables(tree)
    check_model(variables, config, directory)
    return variables, config


def to_device(variables: dict) -> dict:
    """Host variables (as :func:`load_model` gives them) moved to the default device, in place, one array
    at a time: each host array is let go as soon as it is moved, and on the CPU an aligned array (a model
    directory is read into aligned buffers) is adopted without a copy, so the model is in memory once. The
    arrays are committed to this process's first device (a multi-device caller places them itself)."""
    device = jax.local_devices()[0]
    for name, value in variables.items():
        if isinstance(value, dict):
            to_device(value)
        elif isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.writeable:
            variables[name] = jax.dlpack.from_dlpack(value, device=device)
        else:
            variables[name] = jax.device_put(value, device)
    return variables


# ---------------------------------------------------------------------------------------------- encode


def resample_kernel(variables: Mapping) -> Array:
    """The checkpoint's 24k->16k kernel (``wavlm_transfer.kernel``), shared by Whisper and WavLM."""
    return variables["wavlm"]["buffers"]["wavlm_transfer"]["kernel"]


def expert_streams(variables: Mapping, segments: Array, config: ALMTokenizer2Config) -> tuple[Array, ...]:
    """The frozen experts on segments ``(B, N)`` at 24 kHz: ``(whisper (B, n_len, Dw), wavlm (B, T_w, Dl),
    acoustic, semantic (B, T_b, Db))`` (50, 50, 25, 25 Hz), without gradients."""
    e = config.experts
    rate = e.wavlm.input_sample_rate  # the segments' rate; the shared kernel is WavLM's resampler
    wav16 = resample(segments, rate, e.logmel.sample_rate, kernel=resample_kernel(variables))
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
    mu = fill_padding(cond, masks, variables["flow"]["params"]["zero_cond_embedding1"])
    estimator = DiTEstimator(config.dit)
    est_vars = estimator_variables(variables["flow"])
    latents, _ = sample(lambda h, t, *step: estimator.apply(est_vars, h, t, *step), mu,
                        incontext_latents(prompt, masks), prompt_len, x0, sampler)
    return latents


@partial(jax.jit, static_argnames="config")
def decode_latents(variables: Mapping, latents: Array, config: ALMTokenizer2Config) -> Array:
    """SQ latents ``(B, T, C)`` (25 Hz) -> waveform ``(B, T * 960)`` at 24 kHz (quantized first)."""
    wav = SQCodec(config.sqcodec).apply(variables["sqcodec"], latents, method=SQCodec.decode)
    return wav[..., 0]
