"""Fixture adapters: the reference's own descriptions of a component (a fixture's ``meta["config"]``, the
Hugging Face / diffusers / ResidualVQ keyword dicts stored in it) -> our config dataclasses.

They live with the golden runner because only fixtures speak these formats; production reads presets,
model directories (:mod:`almtok_jax.config`) and the release's own files (:mod:`almtok_jax.weights.release`).
Anything a fixture does not state keeps the released value (the dataclass default); an architecture
variant this port does not implement is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from almtok_jax.audio import LogMelConfig
from almtok_jax.config import from_dict
from almtok_jax.experts.musicfm import MusicFMConfig
from almtok_jax.experts.wavlm import WavLMConfig
from almtok_jax.experts.whisper import WhisperConfig, config_from_hf
from almtok_jax.flow.cfm import FlowLossConfig
from almtok_jax.flow.dit import DiTConfig
from almtok_jax.quantizer import BlockConfig, PronunciationConfig, QuantizerConfig, RVQConfig
from almtok_jax.sqcodec import SQCodecConfig


def logmel_config(config: Mapping) -> LogMelConfig:
    """From a fixture's ``feature_extractor`` (a transformers ``WhisperFeatureExtractor`` dict)."""
    fe = config["feature_extractor"]
    return LogMelConfig(fe["sampling_rate"], fe["n_fft"], fe["hop_length"], fe["feature_size"], fe["chunk_length"])


def whisper_fixture_config(config: Mapping) -> WhisperConfig:
    """From a ``whisper_encoder`` fixture's ``meta["config"]``."""
    return config_from_hf(config["whisper_model"], config.get("layer_norm_eps", 1e-5))


def wavlm_config(hf: Mapping, **overrides: Any) -> WavLMConfig:
    """From a transformers ``WavLMConfig`` dict (e.g. fixture ``meta["config"]["wavlm_model"]``).

    Dropout / SpecAugment settings are training-only and ignored; architecture variants this port does not
    implement (stable-layer-norm, layer-norm feature extractor, other activations) are rejected.
    """
    unsupported = {"feat_extract_norm": "group", "do_stable_layer_norm": False,
                   "feat_extract_activation": "gelu", "hidden_act": "gelu"}
    for key, want in unsupported.items():
        if hf.get(key, want) != want:
            raise ValueError(f"WavLM with {key}={hf[key]!r} is not supported (only {want!r})")
    names = {f.name for f in dataclasses.fields(WavLMConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
    return WavLMConfig(**{**kwargs, **overrides})


def musicfm_config(config: Mapping, **overrides: Any) -> MusicFMConfig:
    """From a MusicFM fixture's ``meta["config"]`` (tiny widths, real-model constants)."""
    model, conformer, mel = config["musicfm_model"], config["effective_conformer_config"], config["mel"]
    if conformer.get("hidden_act", "swish") != "swish" or conformer.get("position_embeddings_type",
                                                                         "rotary") != "rotary":
        raise ValueError("only the swish / rotary Wav2Vec2-Conformer of MusicFM is supported")
    if conformer["hidden_size"] != model["encoder_dim"]:
        raise ValueError(f"hidden_size {conformer['hidden_size']} != encoder_dim {model['encoder_dim']}")
    stats = config.get("stats", {})
    kwargs = dict(
        sample_rate=mel["sample_rate"], label_rate=model["label_rate"], n_fft=mel["n_fft"],
        hop_length=mel["hop_length"], n_mels=mel["n_mels"], f_min=mel["f_min"], f_max=mel["f_max"],
        mel_mean=stats.get("melspec_2048_mean", MusicFMConfig.mel_mean),
        mel_std=stats.get("melspec_2048_std", MusicFMConfig.mel_std),
        conv_dim=model["conv_dim"], encoder_dim=model["encoder_dim"],
        encoder_depth=conformer["num_hidden_layers"], num_heads=conformer["num_attention_heads"],
        ffn_dim=conformer["intermediate_size"], depthwise_kernel_size=conformer["conv_depthwise_kernel_size"],
        rotary_base=float(conformer["rotary_embedding_base"]), layer_norm_eps=conformer["layer_norm_eps"],
        output_layers=tuple(model["layers"]),
    )
    return MusicFMConfig(**{**kwargs, **overrides})


def block_config(dim: int, block_kwargs: Mapping) -> BlockConfig:
    """From a fixture's ``dim`` and upstream ``block_kwargs`` (the model's TransformerBlock options)."""
    return BlockConfig(dim=dim, dim_heads=block_kwargs["dim_heads"], ff_mult=block_kwargs["ff_kwargs"]["mult"])


def rvq_config(rvq: Mapping) -> RVQConfig:
    """From a fixture's ``config["rvq"]`` (the ResidualVQ keyword arguments)."""
    if rvq.get("use_cosine_sim", False):
        raise NotImplementedError("cosine-similarity codebooks are not used by ALMTokenizer2")
    return RVQConfig(dim=rvq["dim"], codebook_size=rvq["codebook_size"], codebook_dim=rvq["codebook_dim"],
                     num_quantizers=rvq["num_quantizers"], decay=rvq["decay"],
                     commitment_weight=rvq["commitment_weight"],
                     threshold_ema_dead_code=float(rvq["threshold_ema_dead_code"]))


def pronunciation_config(pron: Mapping, defaults: Mapping | None = None) -> PronunciationConfig:
    """From a fixture's ``config["pron"]`` and ``config["pron_decoder_defaults"]``."""
    d = defaults or {}
    if any(r != 1 for r in d.get("channel_ratios", (1,))):
        raise NotImplementedError(f"channel_ratios {d['channel_ratios']}: only 1 is supported")
    return PronunciationConfig(output_channels=pron["output_channels"], decode_channels=pron["decode_channels"],
                               strides=tuple(pron["strides"]), kernel_size=d.get("kernel_size", 3),
                               unit_kernel_size=d.get("unit_kernel_size", 3),
                               block_dilations=tuple(d.get("block_dilations", (1, 1))),
                               elu_alpha=d.get("elu_alpha", 1.0))


def quantizer_config(config: Mapping) -> QuantizerConfig:
    """From a ``query_quantizer`` fixture's ``meta["config"]``."""
    pron = config.get("pron")
    # A decoder-only fixture (the sampler) has no encoder blocks: the released depth stands in.
    return QuantizerConfig(block=block_config(config["dim"], config["block_kwargs"]),
                           encoder_depth=config.get("enc_blocks", QuantizerConfig.encoder_depth),
                           decoder_depth=config["dec_blocks"],
                           interval=config.get("interval", QuantizerConfig.interval), rvq=rvq_config(config["rvq"]),
                           pronunciation=(pronunciation_config(pron, config.get("pron_decoder_defaults"))
                                          if pron else PronunciationConfig()))


def dit_config(config: Mapping, **overrides: Any) -> DiTConfig:
    """From a fixture's ``meta["config"]``: its ``dit`` section and, if present, ``diffusers_config``."""
    dit = config["dit"]
    diffusers = config.get("diffusers_config", {})
    out_channels, cond_dim = dit["out_channels"], dit["cond_dim"]
    kwargs = dict(
        num_layers=dit["num_layers"], num_attention_heads=dit["num_attention_heads"],
        attention_head_dim=dit["attention_head_dim"], out_channels=out_channels, cond_dim=cond_dim,
        in_channels=diffusers.get("in_channels", 2 * out_channels + cond_dim),
        norm_eps=diffusers.get("norm_eps", DiTConfig.norm_eps),
        num_positional_embeddings=dit.get("num_positional_embeddings", DiTConfig.num_positional_embeddings))
    if diffusers.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"unsupported DiT activation {diffusers['activation_fn']!r}")
    if diffusers.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise ValueError(f"unsupported DiT norm_type {diffusers['norm_type']!r}")
    return DiTConfig(**{**kwargs, **overrides})


def flow_loss_config(config: Mapping) -> FlowLossConfig:
    """From a CFM fixture's ``meta["config"]`` (only ``sigma_min`` is recorded)."""
    return FlowLossConfig(sigma_min=config.get("sigma_min", FlowLossConfig.sigma_min))


def sqcodec_config(config: Mapping) -> SQCodecConfig:
    """From an SQ codec fixture's ``meta["config"]`` (every field, under ``model``)."""
    return from_dict(SQCodecConfig, config.get("model", config), where="fixture meta.config.model", complete=True)
