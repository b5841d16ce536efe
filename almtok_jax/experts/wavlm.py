"""WavLM (post-LN Base/Base+, transformers ``WavLMModel`` in eval mode), the "phone" expert.

The tokenizer (``get_wavlm_feature``, :class:`WavLMExpert`) feeds it the 24 kHz segment resampled to 16 kHz
(the checkpoint's ``wavlm_transfer`` kernel) plus 160 zeros and keeps the mean of
``hidden_states[6:10]``: the outputs of the transformer layers ``5..8`` (``hidden_states[0]`` is the encoder
input after the positional conv and LayerNorm). Only the layers up to the last averaged one exist here;
later checkpoint layers are dropped by :func:`wavlm_rules`.

Rates: 16 kHz samples in, 50 Hz frames out (hop 320). Everything is channels-last ``(B, T, C)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from almtok_jax import layers
from almtok_jax.audio import SAMPLE_RATE, Resampler, resampled_length, resampler_rules
from almtok_jax.component import Component, DeriveError, KeyShapes, ReleaseFiles, layer_indices, shape_of, shapes
from almtok_jax.mapping import Rule, conv1d, identity, linear, prefixed, to_vector

Array = jax.Array


@dataclass(frozen=True)
class WavLMConfig:
    """WavLM hyper-parameters; defaults are the released (Base+-like) model."""

    hidden_size: int = 768
    num_hidden_layers: int = 12  # layers in the checkpoint; only those up to ``feature_layers`` run
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_buckets: int = 320
    max_bucket_distance: int = 800
    gru_rel_pos_features: int = 8  # gate projection width, split as (2, features/2) and summed
    layer_norm_eps: float = 1e-5
    feature_layers: tuple[int, int] = (6, 10)  # average of hidden_states[start:stop]
    pad_samples: int = 160  # zeros appended to the 16 kHz input
    input_sample_rate: int = SAMPLE_RATE
    sample_rate: int = 16000

    def __post_init__(self):
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(f"conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride "
                             f"{self.conv_stride} must have the same length")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                             f"{self.num_attention_heads} heads")
        start, stop = self.feature_layers
        if not 0 <= start < stop or stop - 1 > self.num_hidden_layers:
            raise ValueError(f"feature_layers {self.feature_layers} must be a non-empty range of "
                             f"hidden_states indices 0..{self.num_hidden_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers_used(self) -> int:
        """Transformer layers computed: ``hidden_states[k]`` is the output of layer ``k - 1``."""
        return self.feature_layers[1] - 1


def feature_encoder_frames(num_samples_16k: int, config: WavLMConfig) -> int:
    """Frames of the conv feature encoder for ``num_samples_16k`` (padded) samples; 0 if too short."""
    length = num_samples_16k
    for k, s in zip(config.conv_kernel, config.conv_stride, strict=True):
        if length < k:
            return 0
        length = (length - k) // s + 1
    return length


def num_output_frames(num_samples: int, config: WavLMConfig) -> int:
    """``T_w`` for a 24 kHz segment of ``num_samples``: ``floor((ceil(2N/3) + 160 - 400) / 320) + 1``."""
    resampled = resampled_length(num_samples, config.input_sample_rate, config.sample_rate)
    return feature_encoder_frames(resampled + config.pad_samples, config)


def relative_position_bucket(relative_position: Array, num_buckets: int, max_distance: int) -> Array:
    """WavLM's bucket of ``j - i`` (int), half the buckets per sign, log-spaced beyond ``num_buckets / 4``.

    Computed in float32 like the reference, so bucket boundaries match bit for bit.
    """
    half = num_buckets // 2
    max_exact = half // 2
    distance = jnp.abs(relative_position)
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    scaled = log_ratio / jnp.float32(math.log(max_distance / max_exact)) * (half - max_exact)
    large = jnp.minimum((max_exact + scaled).astype(jnp.int32), half - 1)
    return (relative_position > 0) * half + jnp.where(distance < max_exact, distance, large)


class ChannelGroupNorm(nn.Module):
    """``GroupNorm(num_groups=C, C)``: each channel normalised over the whole time axis ``(B, T, C)``."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return layers.layer_norm(x, self.eps, scale, bias, axes=(1,))


class FeatureEncoder(nn.Module):
    """Strided conv stack, ``(B, L)`` 16 kHz samples -> ``(B, T, conv_dim[-1])`` at 50 Hz."""

    config: WavLMConfig

    @nn.compact
    def __call__(self, wav: Array) -> Array:
        cfg = self.config
        x = wav[..., None]
        for i, (dim, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True)):
            x = layers.Conv1d(dim, k, stride=s, use_bias=cfg.conv_bias, name=f"conv_{i}")(x)
            if i == 0:
                x = ChannelGroupNorm(cfg.layer_norm_eps, name="group_norm")(x)
            x = layers.gelu_exact(x)
        return x


class WavLMLayer(nn.Module):
    """Post-LN transformer layer with the gated relative position bias.

    Scan body: ``(x (B, T, D), position_bias (H, T, T)) -> (x, x)``; the bias (ungated) is shared by all
    layers (broadcast), the output is kept per layer as its ``hidden_states`` entry.
    """

    config: WavLMConfig

    @nn.compact
    def __call__(self, x: Array, position_bias: Array) -> tuple[Array, Array]:
        cfg = self.config
        b, t, d = x.shape
        h = cfg.num_attention_heads
        r = layers.Linear(cfg.gru_rel_pos_features, name="gru_rel_pos_linear")(layers.split_heads(x, h))
        r = jax.nn.sigmoid(r.reshape(b, t, h, 2, cfg.gru_rel_pos_features // 2).sum(-1))
        const = self.param("gru_rel_pos_const", nn.initializers.ones, (h,))
        gate = r[..., 0] * (r[..., 1] * const - 1.0) + 2.0  # (B, T, H)
        gated_bias = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias

        def project(name: str) -> Array:
            return layers.split_heads(layers.Linear(d, name=name)(x), h)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        attn = layers.merge_heads(layers.dot_product_attention(q, k, v, gated_bias))
        attn = layers.Linear(d, name="out_proj")(attn)
        x = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm")(x + attn)
        ff = layers.gelu_exact(layers.Linear(cfg.intermediate_size, name="intermediate_dense")(x))
        ff = layers.Linear(d, name="output_dense")(ff)
        x = layers.LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(x + ff)
        return x, x


class WavLMEncoder(nn.Module):
    """Positional conv + LayerNorm, then the layers up to ``num_layers_used``.

    ``(B, T, D) -> hidden_states (B, num_layers_used + 1, T, D)``, index 0 being the layers' input.
    """

    config: WavLMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        k = cfg.num_conv_pos_embeddings
        pos = layers.Conv1d(cfg.hidden_size, k, groups=cfg.num_conv_pos_embedding_groups, padding=k // 2,
                            use_weight_norm=True, weight_norm_axis=0, name="pos_conv")(x)
        if k % 2 == 0:  # an even kernel with padding k//2 gives one frame too many
            pos = pos[:, :-1]
        x = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm")(x + layers.gelu_exact(pos))

        t = x.shape[1]
        table = self.param("rel_attn_embed", nn.initializers.normal(1.0),
                           (cfg.num_buckets, cfg.num_attention_heads))
        positions = jnp.arange(t)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], cfg.num_buckets,
                                           cfg.max_bucket_distance)
        position_bias = jnp.transpose(table[buckets], (2, 0, 1))  # (H, T_query, T_key)

        layer_stack = nn.scan(WavLMLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=nn.broadcast, length=cfg.num_layers_used)
        _, outputs = layer_stack(cfg, name="layers")(x, position_bias)  # (L, B, T, D)
        return jnp.concatenate([x[:, None], jnp.moveaxis(outputs, 0, 1)], axis=1)


class WavLM(nn.Module):
    """``WavLMModel`` (eval) on padded 16 kHz audio ``(B, L)`` -> ``hidden_states (B, K + 1, T, D)``.

    ``K = config.num_layers_used``. Sows ``conv_features (B, T, C)`` and ``extract_features`` (the
    projection's LayerNorm output) into the ``intermediates`` collection.
    """

    config: WavLMConfig

    @nn.compact
    def __call__(self, wav: Array) -> Array:
        cfg = self.config
        x = FeatureEncoder(cfg, name="feature_extractor")(wav)
        self.sow("intermediates", "conv_features", x)
        x = layers.LayerNorm(cfg.layer_norm_eps, name="feature_layer_norm")(x)
        self.sow("intermediates", "extract_features", x)
        x = layers.Linear(cfg.hidden_size, name="feature_projection")(x)
        return WavLMEncoder(cfg, name="encoder")(x)


def wavlm_rules(config: WavLMConfig) -> list[Rule]:
    """State-dict keys relative to ``wavlm_encoder.`` -> variables of :class:`WavLM`.

    Layers ``0..num_layers_used-1`` are stacked for the scan; later layers and ``masked_spec_embed``
    (SpecAugment, training only) are dropped.
    """
    used = "|".join(str(i) for i in range(config.num_layers_used))
    unused = "|".join(str(i) for i in range(config.num_layers_used, config.num_hidden_layers))
    layer = rf"encoder\.layers\.(?P<i>{used})\."
    out = "params/encoder/layers/"
    rules = [
        Rule(r"masked_spec_embed", None),
        Rule(r"feature_extractor\.conv_layers\.(?P<i>\d+)\.conv\.weight",
             "params/feature_extractor/conv_{i}/kernel", conv1d),
        # a GroupNorm despite its name
        Rule(r"feature_extractor\.conv_layers\.0\.layer_norm\.weight",
             "params/feature_extractor/group_norm/scale"),
        Rule(r"feature_extractor\.conv_layers\.0\.layer_norm\.bias",
             "params/feature_extractor/group_norm/bias"),
        Rule(r"feature_projection\.layer_norm\.weight", "params/feature_layer_norm/scale"),
        Rule(r"feature_projection\.layer_norm\.bias", "params/feature_layer_norm/bias"),
        Rule(r"feature_projection\.projection\.weight", "params/feature_projection/kernel", linear),
        Rule(r"feature_projection\.projection\.bias", "params/feature_projection/bias"),
        Rule(r"encoder\.pos_conv_embed\.conv\.weight_g", "params/encoder/pos_conv/weight_g", to_vector),
        Rule(r"encoder\.pos_conv_embed\.conv\.weight_v", "params/encoder/pos_conv/weight_v", conv1d),
        Rule(r"encoder\.pos_conv_embed\.conv\.bias", "params/encoder/pos_conv/bias"),
        Rule(r"encoder\.layer_norm\.weight", "params/encoder/layer_norm/scale"),
        Rule(r"encoder\.layer_norm\.bias", "params/encoder/layer_norm/bias"),
        Rule(r"encoder\.layers\.0\.attention\.rel_attn_embed\.weight", "params/encoder/rel_attn_embed"),
        Rule(layer + r"attention\.gru_rel_pos_const", out + "gru_rel_pos_const", to_vector, stack="i"),
        Rule(layer + r"attention\.(?P<m>[qkv]_proj|out_proj|gru_rel_pos_linear)\.weight", out + "{m}/kernel",
             linear, stack="i"),
        Rule(layer + r"attention\.(?P<m>[qkv]_proj|out_proj|gru_rel_pos_linear)\.bias", out + "{m}/bias",
             identity, stack="i"),
        Rule(layer + r"feed_forward\.(?P<m>intermediate_dense|output_dense)\.weight", out + "{m}/kernel",
             linear, stack="i"),
        Rule(layer + r"feed_forward\.(?P<m>intermediate_dense|output_dense)\.bias", out + "{m}/bias",
             identity, stack="i"),
        Rule(layer + r"(?P<m>layer_norm|final_layer_norm)\.weight", out + "{m}/scale", identity, stack="i"),
        Rule(layer + r"(?P<m>layer_norm|final_layer_norm)\.bias", out + "{m}/bias", identity, stack="i"),
    ]
    if config.conv_bias:
        rules.append(Rule(r"feature_extractor\.conv_layers\.(?P<i>\d+)\.conv\.bias",
                          "params/feature_extractor/conv_{i}/bias"))
    if unused:
        rules.append(Rule(rf"encoder\.layers\.({unused})\..+", None))
    return rules


def wavlm_expert_rules(config: WavLMConfig) -> list[Rule]:
    """Top-level ``wavlm_encoder.*`` and ``wavlm_transfer.kernel`` -> variables of :class:`WavLMExpert`."""
    return (prefixed("wavlm_encoder.", wavlm_rules(config), target_prefix="wavlm_encoder")
            + prefixed("wavlm_transfer.", resampler_rules(), target_prefix="wavlm_transfer"))


def min_input_samples(config: WavLMConfig) -> int:
    """Shortest 24 kHz segment giving one WavLM frame (359 for the released config)."""
    receptive_field, hop = config.conv_kernel[0], config.conv_stride[0]
    for k, s in zip(config.conv_kernel[1:], config.conv_stride[1:], strict=True):
        receptive_field += (k - 1) * hop
        hop *= s
    need_16k = max(receptive_field - config.pad_samples, 1)
    # smallest N with ceil(N * new / orig) >= need_16k
    return (need_16k - 1) * config.input_sample_rate // config.sample_rate + 1


def check_wavlm_input(wav24k: Array, config: WavLMConfig) -> None:
    """Raise ``ValueError`` unless ``wav24k`` is ``(B, N)`` with N long enough for one WavLM frame."""
    if wav24k.ndim != 2:
        raise ValueError(f"WavLM expects 24 kHz audio of shape (B, N), got shape {tuple(wav24k.shape)}")
    if wav24k.shape[1] < min_input_samples(config):
        raise ValueError(f"WavLM input of {wav24k.shape[1]} samples at {config.input_sample_rate} Hz is too "
                         f"short: at least {min_input_samples(config)} samples are needed for one frame")


class WavLMExpert(nn.Module):
    """``get_wavlm_feature``: ``(B, N)`` 24 kHz -> mean of ``hidden_states[6:10]``, ``(B, T_w, D)`` at 50 Hz.

    ``T_w = num_output_frames(N, config)``. Segments of a batch share one length (no padding mask: the
    GroupNorm and attention are global over time). Sows ``wav16k_padded (B, ceil(2N/3) + 160)`` and
    ``hidden_states`` into ``intermediates``.
    """

    config: WavLMConfig

    @nn.compact
    def __call__(self, wav24k: Array) -> Array:
        cfg = self.config
        check_wavlm_input(wav24k, cfg)
        wav16k = Resampler(cfg.input_sample_rate, cfg.sample_rate, name="wavlm_transfer")(wav24k)
        wav16k = jnp.pad(wav16k, ((0, 0), (0, cfg.pad_samples)))
        self.sow("intermediates", "wav16k_padded", wav16k)
        hidden_states = WavLM(cfg, name="wavlm_encoder")(wav16k)
        self.sow("intermediates", "hidden_states", hidden_states)
        start, stop = cfg.feature_layers
        return jnp.mean(hidden_states[:, start:stop], axis=1)


def resample_kernel(variables: dict) -> Array:
    """The checkpoint's 24k->16k kernel (``wavlm_transfer.kernel``) out of :class:`WavLMExpert` variables; the
    Whisper front end resamples with it too."""
    return variables["buffers"]["wavlm_transfer"]["kernel"]


@partial(jax.jit, static_argnames=("config",))
def wavlm_features(variables: dict, wav24k: Array, config: WavLMConfig) -> Array:
    """Jitted :class:`WavLMExpert`: ``(B, N)`` 24 kHz -> ``(B, T_w, D)`` 50 Hz features."""
    return WavLMExpert(config).apply(variables, wav24k)


def derive_wavlm(key_shapes: KeyShapes, base: WavLMConfig, files: ReleaseFiles) -> WavLMConfig:
    """Sizes from the ``wavlm_encoder.*`` shapes (no release file states them); strides, epsilons, the
    bucket distance, the feature layers and the rates from ``base``."""
    del files

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(key_shapes, "wavlm_encoder." + key, "wavlm")

    convs = [shape(f"feature_extractor.conv_layers.{i}.conv.weight")
             for i in layer_indices(key_shapes, "wavlm_encoder.feature_extractor.conv_layers.")]
    if len(convs) != len(base.conv_stride):
        raise DeriveError(f"wavlm: {len(convs)} feature-encoder convs in the checkpoint, but their strides are known "
                          f"only for {len(base.conv_stride)} (conv_stride {base.conv_stride})")
    hidden = shape("feature_projection.projection.weight")[0]
    attention = "encoder.layers.0.attention."
    return dataclasses.replace(
        base, hidden_size=hidden,
        num_hidden_layers=len(layer_indices(key_shapes, "wavlm_encoder.encoder.layers.")),
        num_attention_heads=shape(attention + "gru_rel_pos_const")[1],
        intermediate_size=shape("encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
        conv_dim=tuple(s[0] for s in convs), conv_kernel=tuple(s[2] for s in convs),
        conv_bias="wavlm_encoder.feature_extractor.conv_layers.0.conv.bias" in key_shapes,
        num_conv_pos_embeddings=shape("encoder.pos_conv_embed.conv.weight_v")[2],
        num_conv_pos_embedding_groups=hidden // shape("encoder.pos_conv_embed.conv.weight_v")[1],
        num_buckets=shape(attention + "rel_attn_embed.weight")[0],
        gru_rel_pos_features=shape(attention + "gru_rel_pos_linear.weight")[0])


WAVLM = Component(
    "wavlm", frozen=True, config_path="experts.wavlm", module=WavLMExpert,
    example_inputs=lambda w: shapes((1, min_input_samples(w))), rules=wavlm_expert_rules,
    key_names=("wavlm_encoder", "wavlm_transfer"), derive=derive_wavlm)
