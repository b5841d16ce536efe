"""SQ codec: the scalar-quantized convolutional autoencoder that defines ALMTokenizer2's latent space.

Upstream ``models/scalar24k.py`` (``ScalarModel``), spec ``04-sqcodec-training.md`` part A. A waveform at
``sample_rate`` is encoded to a ``tanh`` latent of ``latent_hidden_dim`` channels at
``sample_rate / hop_length`` frames per second (25 Hz for the release); :func:`round_latents` maps it to
``round(9 z) / 9``; the decoder turns (quantized) latents back into a waveform.

Layouts: every array here is channels-last. Waveforms are ``(B, N, num_bands)`` (``(B, N)`` is accepted on
input when ``num_bands == 1``); latents are ``(B, F, latent_hidden_dim)``.

Entry points (jit-compiled, ``config`` static, ``params`` = the variables ``{"params": ...}`` of
:data:`SQCODEC` ``.load`` or ``.init``):

* :func:`sq_encode` -> the **un-quantized** tanh latent (what upstream ``encode`` returns);
* :func:`sq_decode` -> waveform; quantizes its input first, no clamp, no output activation;
* :func:`sq_forward_trace` -> the reconstruction ``decode(encode(wav))`` plus every encoder/decoder list
  element's output, keyed by the state-dict prefix (``"encoder.3"``, ``"decoder.0"``...).

Lengths (:func:`latent_frames`, :func:`decoded_length`): causal, ``F = ceil(N / hop_length)`` and the
decoder gives ``F * hop_length`` samples; non-causal strided convs floor, odd-stride transposed convs add a
sample each, and with ``num_samples > 1`` the average pool floors.

Loading: :data:`SQCODEC` converts ``sqcodec.pth['codec_model']`` (keys ``encoder.*``/``decoder.*``,
old-style weight norm) through :func:`sqcodec_rules`, after checking the checkpoint against the config.
The five ``encoder.{b}.down_conv.activation.weight`` keys are ONE shared PReLU upstream (a default
argument evaluated once); like ``load_state_dict`` the last block's copy wins, the others are dropped, and
a warning is issued if they differ.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from almtok_jax.audio import SAMPLE_RATE
from almtok_jax.component import CODEC_STATE, SQ_CONFIG, Component, KeyShapes, ReleaseFiles, shapes
from almtok_jax.layers import Conv1d, ConvTranspose1d, PReLU, prelu
from almtok_jax.mapping import (
    MappingError,
    Rule,
    canonical_key,
    conv1d,
    conv_transpose1d,
    to_vector,
)
from almtok_jax.typed_config import from_dict

Array = jax.Array

QUANT_LEVELS_PER_UNIT = 9.0  # q(z) = round(9 z) / 9: 19 levels for |z| < 1
RES_DILATIONS = (1, 3, 5, 7, 9)  # dilations of the five PReLUResidualUnits of every block


@dataclass(frozen=True)
class SQCodecConfig:
    """The 13 ``generator.config`` fields of ``sq_config.yaml``; defaults = the released architecture.

    ``sample_rate`` documents the input rate and is not used by the network. Channels are
    ``init_channel * 2**i`` after encoder stage ``i``.
    """

    num_bands: int = 1
    sample_rate: int = SAMPLE_RATE
    causal: bool = True
    num_samples: int = 1
    downsample_factors: tuple[int, ...] = (3, 4, 4, 4, 5)
    downsample_kernel_sizes: tuple[int, ...] = (6, 8, 8, 8, 10)
    upsample_factors: tuple[int, ...] = (5, 4, 4, 4, 3)
    upsample_kernel_sizes: tuple[int, ...] = (10, 8, 8, 8, 6)
    latent_hidden_dim: int = 136
    default_kernel_size: int = 7
    delay_kernel_size: int = 5
    init_channel: int = 64
    res_kernel_size: int = 7

    def __post_init__(self) -> None:
        for name in ("downsample_factors", "downsample_kernel_sizes", "upsample_factors",
                     "upsample_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.downsample_factors)
        lengths = {name: len(getattr(self, name)) for name in
                   ("downsample_kernel_sizes", "upsample_factors", "upsample_kernel_sizes")}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"SQCodecConfig: every stage list needs {n} entries like downsample_factors, "
                             f"got {lengths}")
        if n == 0 or self.num_samples < 1 or self.num_bands < 1 or self.init_channel < 1:
            raise ValueError(f"SQCodecConfig: need >= 1 stage, num_samples, num_bands and init_channel, "
                             f"got {n} stages, {self.num_samples}, {self.num_bands}, {self.init_channel}")
        if self.causal:
            for s, k in zip(self.upsample_factors, self.upsample_kernel_sizes, strict=True):
                if k != 2 * s:
                    raise ValueError(f"SQCodecConfig: a causal transposed conv needs kernel = 2 x stride, "
                                     f"got kernel {k} for stride {s} (upsample_kernel_sizes)")

    @property
    def num_stages(self) -> int:
        return len(self.downsample_factors)

    @property
    def hop_length(self) -> int:
        """Input samples per latent frame: ``num_samples * prod(downsample_factors)`` (960 released)."""
        return self.num_samples * math.prod(self.downsample_factors)


# ----------------------------------------------------------------------------------------------- lengths

def _conv_length(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> int:
    span = dilation * (kernel - 1)
    pad = span if causal else 2 * (span // 2)
    return (length + pad - span - 1) // stride + 1


def _conv_transpose_length(length: int, kernel: int, stride: int, causal: bool) -> int:
    if causal:
        return length * stride  # (L - 1) s + 2s, minus the s trimmed samples
    return (length - 1) * stride - 2 * ((kernel - stride) // 2) + kernel


def latent_frames(num_samples_in: int, config: SQCodecConfig) -> int:
    """Latent frames of a waveform of ``num_samples_in`` samples (``ceil(N / hop_length)`` if causal)."""
    c = config
    length = _conv_length(num_samples_in, c.default_kernel_size, 1, 1, c.causal)
    if c.num_samples > 1:
        length = _conv_length(length, c.default_kernel_size, 1, 1, c.causal) // c.num_samples
    for s, k in zip(c.downsample_factors, c.downsample_kernel_sizes, strict=True):
        length = _conv_length(length, c.res_kernel_size, 1, 1, c.causal)  # residual units keep L
        length = _conv_length(length, k, s, 1, c.causal)
    return _conv_length(length, c.default_kernel_size, 1, 1, c.causal)


def decoded_length(frames: int, config: SQCodecConfig) -> int:
    """Waveform samples decoded from ``frames`` latent frames (``frames * hop_length`` if causal)."""
    c = config
    length = _conv_length(frames, c.delay_kernel_size, 1, 1, causal=False)
    for s, k in zip(c.upsample_factors, c.upsample_kernel_sizes, strict=True):
        length = _conv_transpose_length(length, k, s, c.causal)
    if c.num_samples > 1:
        length = _conv_length(length * c.num_samples, c.default_kernel_size, 1, 1, c.causal)
    return _conv_length(length, c.default_kernel_size, 1, 1, c.causal)


# --------------------------------------------------------------------------------------------- quantizer

@jax.custom_vjp
def round_latents(z: Array) -> Array:
    """``round(9 z) / 9`` (round half to even, in ``z``'s dtype, no clamp); straight-through gradient."""
    return jnp.round(z * QUANT_LEVELS_PER_UNIT) / QUANT_LEVELS_PER_UNIT


def _round_latents_fwd(z: Array) -> tuple[Array, None]:
    return round_latents(z), None


def _round_latents_bwd(_, cotangent: Array) -> tuple[Array]:
    return (cotangent,)


round_latents.defvjp(_round_latents_fwd, _round_latents_bwd)


# ---------------------------------------------------------------------------------------------- modules

def _padding(causal: bool) -> str:
    return "causal" if causal else "same_torch"


class PReLUResidualUnit(nn.Module):
    """``x + PReLU(Conv_1x1(PReLU(Conv_k,dilated(x))))`` at constant channels and length."""

    kernel_size: int
    dilation: int
    causal: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n = x.shape[-1]
        h = Conv1d(n, self.kernel_size, dilation=self.dilation, padding=_padding(self.causal),
                   use_weight_norm=True, name="conv1")(x)
        h = PReLU(name="activation1")(h)
        h = Conv1d(n, 1, use_weight_norm=True, name="conv2")(h)
        return x + PReLU(name="activation2")(h)


class _ResampleBlock(nn.Module):
    """Fields of a codec stage that changes the frame rate by ``stride`` (``kernel_size`` taps) beside five
    residual units (dilations :data:`RES_DILATIONS`, ``res_kernel_size`` taps)."""

    features: int
    stride: int
    kernel_size: int
    res_kernel_size: int
    causal: bool

    def residual_units(self, x: Array) -> Array:
        for j, d in enumerate(RES_DILATIONS):
            x = PReLUResidualUnit(self.res_kernel_size, d, self.causal, name=f"convs_{j}")(x)
        return x


class ResEncoderBlock(_ResampleBlock):
    """Five residual units, then the strided down-sampling conv and the codec-wide shared PReLU.

    ``(B, L, C) -> (B, L', features)``.
    """

    @nn.compact
    def __call__(self, x: Array, down_slope: Array) -> Array:
        x = Conv1d(self.features, self.kernel_size, stride=self.stride, padding=_padding(self.causal),
                   use_weight_norm=True, name="down_conv")(self.residual_units(x))
        return prelu(x, down_slope)


class ResDecoderBlock(_ResampleBlock):
    """Transposed-conv up-sampling (no activation), then five residual units. ``(B, L, C) -> (B, L', f)``."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s, k = self.stride, self.kernel_size
        x = ConvTranspose1d(self.features, k, stride=s, padding=0 if self.causal else (k - s) // 2,
                            trim_right=s if self.causal else 0, use_weight_norm=True, name="up_conv")(x)
        return self.residual_units(x)


class PreProcessor(nn.Module):
    """Plain conv -> PReLU -> average pool by ``factor`` (trailing samples that fill no window dropped)."""

    factor: int
    kernel_size: int
    causal: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, length, c = x.shape
        x = Conv1d(c, self.kernel_size, padding=_padding(self.causal), name="conv")(x)
        x = PReLU(name="activation")(x)
        frames = length // self.factor
        return x[:, : frames * self.factor].reshape(b, frames, self.factor, c).mean(axis=2)


class PostProcessor(nn.Module):
    """Repeat every step ``factor`` times -> plain conv -> PReLU."""

    factor: int
    kernel_size: int
    causal: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(x, self.factor, axis=1)
        x = Conv1d(x.shape[-1], self.kernel_size, padding=_padding(self.causal), name="conv")(x)
        return PReLU(name="activation")(x)


def _run_sown(module: nn.Module, x: Array, apply: Callable[[nn.Module, Array], Array]) -> Array:
    """Run ``module.layers`` in order; the output of ``layers_{i}`` is sown as ``intermediates/out_{i}``."""
    for i, layer in enumerate(module.layers):
        x = apply(layer, x)
        module.sow("intermediates", f"out_{i}", x)
    return x


class SQEncoder(nn.Module):
    """Waveform ``(B, N, num_bands)`` -> tanh latent ``(B, F, latent_hidden_dim)`` (not quantized).

    Submodule ``layers_{i}`` is upstream ``encoder.{i}``: input conv, pre-processor (if ``num_samples > 1``),
    one :class:`ResEncoderBlock` per down-sampling factor, output conv.
    """

    config: SQCodecConfig

    def setup(self) -> None:
        c = self.config
        pad = _padding(c.causal)
        self.layers = [
            Conv1d(c.init_channel, c.default_kernel_size, padding=pad, use_weight_norm=True),
            *([PreProcessor(c.num_samples, c.default_kernel_size, c.causal)] if c.num_samples > 1 else []),
            *(ResEncoderBlock(c.init_channel * 2 ** (stage + 1), s, k, c.res_kernel_size, c.causal)
              for stage, (s, k) in enumerate(zip(c.downsample_factors, c.downsample_kernel_sizes, strict=True))),
            Conv1d(c.latent_hidden_dim, c.default_kernel_size, padding=pad, use_weight_norm=True)]
        # Upstream's DownsampleLayer default argument: one PReLU object shared by every stage.
        self.down_activation = self.param("down_activation", nn.initializers.constant(0.25), (1,))

    def __call__(self, wav: Array) -> Array:
        def apply(layer: nn.Module, x: Array) -> Array:
            return layer(x, self.down_activation) if isinstance(layer, ResEncoderBlock) else layer(x)

        return jnp.tanh(_run_sown(self, wav, apply))


class SQDecoder(nn.Module):
    """Latent ``(B, F, latent_hidden_dim)`` -> waveform ``(B, N', num_bands)``; quantizes its input first.

    Submodule ``layers_{i}`` is upstream ``decoder.{i}``: input conv (non-causal in every configuration:
    ``delay_kernel_size // 2`` frames of look-ahead), one :class:`ResDecoderBlock` per up-sampling factor,
    post-processor (if ``num_samples > 1``), output conv.
    """

    config: SQCodecConfig

    def setup(self) -> None:
        c = self.config
        n = c.num_stages
        self.layers = [
            Conv1d(c.init_channel * 2 ** n, c.delay_kernel_size, padding="same_torch", use_weight_norm=True),
            *(ResDecoderBlock(c.init_channel * 2 ** (n - stage - 1), s, k, c.res_kernel_size, c.causal)
              for stage, (s, k) in enumerate(zip(c.upsample_factors, c.upsample_kernel_sizes, strict=True))),
            *([PostProcessor(c.num_samples, c.default_kernel_size, c.causal)] if c.num_samples > 1 else []),
            Conv1d(c.num_bands, c.default_kernel_size, padding=_padding(c.causal), use_weight_norm=True)]

    def __call__(self, latents: Array) -> Array:
        return _run_sown(self, round_latents(latents), lambda layer, x: layer(x))


class SQCodec(nn.Module):
    """``ScalarModel``: ``encode`` (tanh latent), ``decode`` (:func:`round_latents`, then decode), ``__call__``
    = both."""

    config: SQCodecConfig

    def setup(self) -> None:
        self.encoder = SQEncoder(self.config)
        self.decoder = SQDecoder(self.config)

    def encode(self, wav: Array) -> Array:
        return self.encoder(wav)

    def decode(self, latents: Array) -> Array:
        return self.decoder(latents)

    def __call__(self, wav: Array) -> Array:
        return self.decoder(self.encoder(wav))


# ------------------------------------------------------------------------------------------- public API

def _check_wav(wav: Array, config: SQCodecConfig) -> Array:
    """``(B, N)`` (mono) or ``(B, N, num_bands)`` -> ``(B, N, num_bands)``; at least one latent frame."""
    if wav.ndim == 2 and config.num_bands == 1:
        wav = wav[..., None]
    if wav.ndim != 3 or wav.shape[-1] != config.num_bands:
        raise ValueError(f"SQ codec waveform must be (B, N, {config.num_bands})"
                         f"{' or (B, N)' if config.num_bands == 1 else ''}, got shape {wav.shape}")
    if latent_frames(wav.shape[1], config) < 1:
        raise ValueError(f"waveform of {wav.shape[1]} samples is too short for the SQ codec")
    return wav


def _check_latents(latents: Array, config: SQCodecConfig) -> None:
    if latents.ndim != 3 or latents.shape[-1] != config.latent_hidden_dim or latents.shape[1] < 1:
        raise ValueError(f"SQ codec latents must be (B, F >= 1, {config.latent_hidden_dim}), "
                         f"got shape {latents.shape}")


@partial(jax.jit, static_argnames="config")
def sq_encode(params: Mapping, wav: Array, config: SQCodecConfig) -> Array:
    """Waveform ``(B, N)`` / ``(B, N, num_bands)`` -> un-quantized tanh latent ``(B, F, latent_hidden_dim)``.

    ``F = latent_frames(N, config)``.
    """
    return SQCodec(config).apply(params, _check_wav(wav, config), method=SQCodec.encode)


@partial(jax.jit, static_argnames="config")
def sq_decode(params: Mapping, latents: Array, config: SQCodecConfig) -> Array:
    """Latents ``(B, F, D)`` (quantized here) -> waveform ``(B, decoded_length(F), num_bands)``."""
    _check_latents(latents, config)
    return SQCodec(config).apply(params, latents, method=SQCodec.decode)


@partial(jax.jit, static_argnames="config")
def sq_forward_trace(params: Mapping, wav: Array, config: SQCodecConfig) -> tuple[Array, dict[str, Array]]:
    """Reconstruction ``decode(encode(wav))`` ``(B, N[, num_bands]) -> (B, N', num_bands)`` and the output of
    every ``encoder.{i}`` / ``decoder.{i}`` element (channels-last).

    ``encoder.{last}`` is the last conv's output before ``tanh``; ``decoder.0`` sees the quantized latent.
    """
    out, state = SQCodec(config).apply(params, _check_wav(wav, config), mutable=["intermediates"])
    traces = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        half, name = path[0], path[-1]
        traces[f"{half}.{name.removeprefix('out_')}"] = value[0]
    return out, traces


# -------------------------------------------------------------------------------------- weight loading

def _wn_conv_rules(source: str, target: str, transposed: bool = False) -> list[Rule]:
    """Old-style weight-normed conv ``<source>.{bias, weight_g, weight_v}`` -> ``<target>/...``."""
    return [
        Rule(source + r"\.weight_v", target + "/weight_v", conv_transpose1d if transposed else conv1d),
        Rule(source + r"\.weight_g", target + "/weight_g", to_vector),
        Rule(source + r"\.bias", target + "/bias"),
    ]


def sqcodec_rules(config: SQCodecConfig) -> list[Rule]:
    """Rules for the ``codec_model`` state dict (keys ``encoder.*``, ``decoder.*``) -> ``params/...``.

    Only the last ``encoder.{b}.down_conv.activation.weight`` is kept (upstream's shared PReLU: on
    ``load_state_dict`` the last copy wins); the other copies are dropped.
    """
    last_block = config.num_stages + (1 if config.num_samples > 1 else 0)
    rules = [Rule(rf"encoder\.{last_block}\.down_conv\.activation\.weight", "params/encoder/down_activation"),
             Rule(r"encoder\.\d+\.down_conv\.activation\.weight", None)]
    for half in ("encoder", "decoder"):
        layer, target = rf"{half}\.(?P<i>\d+)", f"params/{half}/layers_{{i}}"
        unit = layer + r"\.convs\.(?P<j>\d+)"
        rules += _wn_conv_rules(layer, target)
        rules += _wn_conv_rules(unit + r"\.(?P<c>conv[12])", target + "/convs_{j}/{c}")
        rules.append(Rule(unit + r"\.(?P<a>activation[12])\.weight", target + "/convs_{j}/{a}/weight"))
        # Pre-/PostProcessor (num_samples > 1): plain conv + PReLU.
        rules.append(Rule(layer + r"\.conv\.weight", target + "/conv/kernel", conv1d))
        rules.append(Rule(layer + r"\.conv\.bias", target + "/conv/bias"))
        rules.append(Rule(layer + r"\.activation\.weight", target + "/activation/weight"))
    rules += _wn_conv_rules(r"encoder\.(?P<i>\d+)\.down_conv\.layer", "params/encoder/layers_{i}/down_conv")
    rules += _wn_conv_rules(r"decoder\.(?P<i>\d+)\.up_conv\.layer", "params/decoder/layers_{i}/up_conv",
                            transposed=True)
    return rules


def sqcodec_checkpoint_shapes(config: SQCodecConfig) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of the state-dict entries that pin the architecture (spec A.2 table).

    Channels, latent dim, stage count, Pre/PostProcessor presence and every kernel size are read off these;
    strides and ``causal`` are not stored in a checkpoint.
    """
    c = config
    c0, n, top = c.init_channel, c.num_stages, c.init_channel * 2 ** c.num_stages
    off = 1 if c.num_samples > 1 else 0
    shapes = {"encoder.0.weight_v": (c0, c.num_bands, c.default_kernel_size)}
    if off:
        shapes["encoder.1.conv.weight"] = (c0, c0, c.default_kernel_size)
    for stage, k in enumerate(c.downsample_kernel_sizes):
        i, ch = 1 + off + stage, c0 * 2 ** stage
        shapes[f"encoder.{i}.convs.0.conv1.weight_v"] = (ch, ch, c.res_kernel_size)
        shapes[f"encoder.{i}.down_conv.layer.weight_v"] = (2 * ch, ch, k)
    shapes[f"encoder.{n + 1 + off}.weight_v"] = (c.latent_hidden_dim, top, c.default_kernel_size)
    shapes["decoder.0.weight_v"] = (top, c.latent_hidden_dim, c.delay_kernel_size)
    for stage, k in enumerate(c.upsample_kernel_sizes):
        i, ch = 1 + stage, top // 2 ** stage
        shapes[f"decoder.{i}.up_conv.layer.weight_v"] = (ch, ch // 2, k)
        shapes[f"decoder.{i}.convs.0.conv1.weight_v"] = (ch // 2, ch // 2, c.res_kernel_size)
    if off:
        shapes[f"decoder.{n + 1}.conv.weight"] = (c0, c0, c.default_kernel_size)
    shapes[f"decoder.{n + 1 + off}.weight_v"] = (c.num_bands, c0, c.default_kernel_size)
    return shapes


def check_sqcodec_checkpoint(state_dict: Mapping[str, np.ndarray], config: SQCodecConfig,
                             source: str = "SQ codec state dict") -> None:
    """Raise one :class:`MappingError` naming every architecture key whose shape contradicts ``config``."""
    shapes = {canonical_key(k): tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = []
    stages = sum(bool(re.fullmatch(r"encoder\.\d+\.down_conv\.layer\.weight_v", k)) for k in shapes)
    if stages != config.num_stages:
        problems.append(f"{stages} encoder stages (encoder.*.down_conv.layer.weight_v) in the checkpoint, "
                        f"{config.num_stages} in the config (downsample_factors)")
    has_pre = "encoder.1.conv.weight" in shapes
    if has_pre != (config.num_samples > 1):
        problems.append(f"checkpoint {'has' if has_pre else 'lacks'} the PreProcessor "
                        f"(encoder.1.conv.weight) but the config has num_samples={config.num_samples}")
    if not problems:
        for key, want in sqcodec_checkpoint_shapes(config).items():
            got = shapes.get(key)
            if got != want:
                problems.append(f"{key}: checkpoint {'has no such key' if got is None else got}, "
                                f"config implies {want}")
    if problems:
        details = "\n  ".join(problems)
        raise MappingError(f"{source} does not match the SQ codec config {config}:\n  {details}")


def check_codec_state(state_dict: Mapping[str, np.ndarray], config: SQCodecConfig,
                      source: str = "SQ codec state dict") -> None:
    """Before conversion: :func:`check_sqcodec_checkpoint`, and a warning if the copies of the shared
    down-sampling PReLU differ (the last one is used, as upstream)."""
    check_sqcodec_checkpoint(state_dict, config, source)
    slopes = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in state_dict.items()
              if re.fullmatch(r"encoder\.\d+\.down_conv\.activation\.weight", k)}
    if len(set(slopes.values())) > 1:
        warnings.warn(f"{source}: the shared down-sampling PReLU copies differ ({slopes}); using the last "
                      f"block's, as upstream load_state_dict does", stacklevel=2)


def sq_config_from_section(section: dict, where: str) -> SQCodecConfig:
    """:class:`SQCodecConfig` from the ``generator.config`` mapping of a release ``sq_config.yaml``, every field
    required: upstream splats them into a constructor without defaults (:class:`ConfigError` naming ``where``)."""
    return from_dict(SQCodecConfig, section, where=where, complete=True)


def derive_sqcodec(key_shapes: KeyShapes, base: SQCodecConfig, files: ReleaseFiles) -> SQCodecConfig:
    """``generator.config`` of ``sq_config.yaml``, which states all 13 fields (the shapes are checked against it
    by :func:`check_sqcodec_checkpoint` at conversion)."""
    del key_shapes, base
    return sq_config_from_section(files[SQ_CONFIG], f"{SQ_CONFIG}: generator.config")


SQCODEC = Component(
    "sqcodec", frozen=True, config_path="sqcodec", module=SQCodec,
    example_inputs=lambda s: shapes((1, 2 * s.hop_length, s.num_bands)), rules=sqcodec_rules,
    source=CODEC_STATE, check_state=check_codec_state, derive=derive_sqcodec)
