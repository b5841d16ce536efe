"""Whisper encoder (transformers v4.29.1 ``WhisperEncoder``), the first frozen expert, channels-last.

log-mel ``(B, 3000, 80)`` at 100 Hz -> conv stem (k3 s1, k3 s2, exact GELU) -> + the full position table
-> pre-LN transformer layers (scanned) -> final LayerNorm -> ``(B, 1500, d_model)`` at 50 Hz. The tokenizer
keeps the first ``n_len = int(N / 24000 * 50)`` frames (:func:`whisper_n_len`, :func:`whisper_feature`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax import mapping
from almtok_jax.audio import LogMelConfig
from almtok_jax.component import WHISPER_CONFIG, Component, KeyShapes, ReleaseFiles, layer_indices, shape_of, shapes
from almtok_jax.layers import Conv1d, LayerNorm, Linear, dot_product_attention, gelu_exact, merge_heads, split_heads
from almtok_jax.mapping import Rule

Array = jax.Array
STEM_STRIDE = 2  # stride of the stem's conv2: log-mel frames per encoder frame


@dataclass(frozen=True)
class WhisperConfig:
    """Encoder hyper-parameters; defaults are whisper-medium (the released tokenizer's expert)."""

    d_model: int = 1024
    encoder_layers: int = 24
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_mel_frames(self) -> int:
        """The only accepted input length: the conv stem halves it onto the full position table."""
        return STEM_STRIDE * self.max_source_positions


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """OpenAI Whisper's position table ``[sin | cos]`` ``(length, channels)``, used as the init value."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))
    angles = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class WhisperAttention(nn.Module):
    """Unmasked self-attention: q scaled by ``head_dim**-0.5`` after its bias; ``k_proj`` has no bias."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        q = Linear(c.d_model, name="q_proj")(x) * (c.head_dim ** -0.5)
        k = Linear(c.d_model, use_bias=False, name="k_proj")(x)
        v = Linear(c.d_model, name="v_proj")(x)
        o = dot_product_attention(*(split_heads(a, c.encoder_attention_heads) for a in (q, k, v)), scale=1.0)
        return Linear(c.d_model, name="out_proj")(merge_heads(o))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block ``x += attn(LN(x)); x += fc2(GELU(fc1(LN(x))))``.

    Scan body: ``x -> (x, x if collect else None)`` (the per-layer output only when it is collected).
    """

    config: WhisperConfig
    collect: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array | None]:
        c = self.config
        h = LayerNorm(c.layer_norm_eps, name="self_attn_layer_norm")(x)
        x = x + WhisperAttention(c, name="self_attn")(h)
        h = LayerNorm(c.layer_norm_eps, name="final_layer_norm")(x)
        x = x + Linear(c.d_model, name="fc2")(gelu_exact(Linear(c.encoder_ffn_dim, name="fc1")(h)))
        return x, (x if self.collect else None)


class WhisperEncoder(nn.Module):
    """``mel (B, 3000, n_mels)`` channels-last -> ``last_hidden_state (B, 1500, d_model)``.

    With ``output_hidden_states=True`` also returns the ``hidden_states`` tuple stacked as
    ``(layers + 1, B, 1500, d_model)``: [0] = conv stem + positions, [i] = output of layer i-1, and the
    last entry has the final LayerNorm applied (it equals ``last_hidden_state``), as in the reference.
    """

    config: WhisperConfig

    @nn.compact
    def __call__(self, mel: Array, output_hidden_states: bool = False) -> Array | tuple[Array, Array]:
        c = self.config
        if mel.ndim != 3 or mel.shape[1:] != (c.num_mel_frames, c.num_mel_bins):
            raise ValueError(f"Whisper encoder expects a log-mel of shape (B, {c.num_mel_frames}, "
                             f"{c.num_mel_bins}) (30 s, channels-last), got {mel.shape}")
        x = gelu_exact(Conv1d(c.d_model, 3, padding=1, name="conv1")(mel))
        x = gelu_exact(Conv1d(c.d_model, 3, stride=STEM_STRIDE, padding=1, name="conv2")(x))
        positions = self.param("embed_positions", lambda _: jnp.asarray(
            sinusoid_positions(c.max_source_positions, c.d_model)))
        x = x + positions
        layers = nn.scan(WhisperEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=c.encoder_layers)
        h, per_layer = layers(c, collect=output_hidden_states, name="layers")(x)
        last = LayerNorm(c.layer_norm_eps, name="layer_norm")(h)
        if not output_hidden_states:
            return last
        return last, jnp.concatenate([x[None], per_layer[:-1], last[None]], axis=0)


def whisper_frame_rate(logmel: LogMelConfig) -> float:
    """Encoder frames per second: the log-mel rate over the stem stride (16000 / 160 / 2 = 50 Hz)."""
    return logmel.sample_rate / logmel.hop_length / STEM_STRIDE


def whisper_n_len(num_samples: int, sample_rate: int = 24000, frame_rate: int = 50,
                  max_frames: int = 1500) -> int:
    """Frames kept of a segment of ``num_samples`` (``sample_rate`` audio): ``int((N / sr) * 50)``, <= 1500.

    The float64 expression (not ``N // 480``) is the reference: it gives one frame less for 73 multiples of
    480 up to 720 240 samples (e.g. N = 13 920 -> 28).
    """
    return min(int((num_samples / sample_rate) * frame_rate), max_frames)


def whisper_feature(last_hidden_state: Array, num_samples: int, sample_rate: int = 24000) -> Array:
    """``last_hidden_state[:, :n_len]`` ``(B, n_len, d_model)`` for a segment of ``num_samples`` samples."""
    n_len = whisper_n_len(num_samples, sample_rate, max_frames=last_hidden_state.shape[1])
    return last_hidden_state[:, :n_len]


_LAYER = r"layers\.(?P<i>\d+)\."


def whisper_rules(config: WhisperConfig) -> list[Rule]:
    """Reference keys (relative to ``whisper_encoder.``) -> :class:`WhisperEncoder` params, layers stacked."""
    del config  # key names do not depend on the size
    rules = [
        Rule(r"conv(?P<n>[12])\.weight", "params/conv{n}/kernel", mapping.conv1d),
        Rule(r"conv(?P<n>[12])\.bias", "params/conv{n}/bias"),
        Rule(r"embed_positions\.weight", "params/embed_positions"),
        Rule(r"layer_norm\.weight", "params/layer_norm/scale"),
        Rule(r"layer_norm\.bias", "params/layer_norm/bias"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        target = f"params/layers/self_attn/{proj}"
        rules += [Rule(_LAYER + rf"self_attn\.{proj}\.weight", f"{target}/kernel", mapping.linear, stack="i"),
                  Rule(_LAYER + rf"self_attn\.{proj}\.bias", f"{target}/bias", stack="i")]
    for fc in ("fc1", "fc2"):
        rules += [Rule(_LAYER + rf"{fc}\.weight", f"params/layers/{fc}/kernel", mapping.linear, stack="i"),
                  Rule(_LAYER + rf"{fc}\.bias", f"params/layers/{fc}/bias", stack="i")]
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        rules += [Rule(_LAYER + rf"{norm}\.weight", f"params/layers/{norm}/scale", stack="i"),
                  Rule(_LAYER + rf"{norm}\.bias", f"params/layers/{norm}/bias", stack="i")]
    return rules


def config_from_hf(hf: Mapping, layer_norm_eps: float) -> WhisperConfig:
    """From a Hugging Face ``WhisperConfig`` dict (``whisper-medium/config.json``; decoder fields unused)."""
    return WhisperConfig(hf["d_model"], hf["encoder_layers"], hf["encoder_attention_heads"], hf["encoder_ffn_dim"],
                         hf["num_mel_bins"], hf["max_source_positions"], layer_norm_eps)


def derive_whisper(key_shapes: KeyShapes, base: WhisperConfig, files: ReleaseFiles) -> WhisperConfig:
    """From ``whisper-medium/config.json``; without it, sizes from the keys and the head size of ``base``."""
    if WHISPER_CONFIG in files:
        return config_from_hf(files[WHISPER_CONFIG], base.layer_norm_eps)
    d_model, num_mel_bins, _ = shape_of(key_shapes, "conv1.weight", "whisper")
    return dataclasses.replace(
        base, d_model=d_model, num_mel_bins=num_mel_bins, encoder_layers=len(layer_indices(key_shapes, "layers.")),
        encoder_attention_heads=d_model // base.head_dim,
        encoder_ffn_dim=shape_of(key_shapes, "layers.0.fc1.weight", "whisper")[0],
        max_source_positions=shape_of(key_shapes, "embed_positions.weight", "whisper")[0])


WHISPER = Component(
    "whisper", frozen=True, config_path="experts.whisper", module=WhisperEncoder,
    example_inputs=lambda w: shapes((1, w.num_mel_frames, w.num_mel_bins)), rules=whisper_rules,
    key_prefix="whisper_encoder.", derive=derive_whisper)
