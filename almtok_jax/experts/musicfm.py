"""MusicFM-25Hz, the BEST-RQ music expert, in eval mode (spec 01-experts.md §5).

24 kHz mono audio ``(B, N)`` is trimmed to ``floor(N/960)*960`` samples, turned into a 128-band HTK mel
in dB at 100 Hz (always float32), normalised with fixed MSD statistics, subsampled 4x in time (and mel)
by two residual Conv2d modules, and run through a rotary Wav2Vec2-Conformer. The outputs are the
``layer_results`` the reference returns: index 0 is the subsampling output, index ``i`` the output of
block ``i-1`` (after that block's final LayerNorm), index ``encoder_depth`` the encoder LayerNorm of the
last block. ALMTokenizer2 uses 4 ("acoustic") and 11 ("semantic"), both ``(B, floor(N/960), D)`` at 25 Hz.

Only the blocks up to the last requested layer are built (and loaded), run with ``nn.scan``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.audio import SAMPLE_RATE, hann_window, mel_filters
from almtok_jax.component import Component, DeriveError, KeyShapes, ReleaseFiles, layer_indices, shape_of, shapes
from almtok_jax.layers import (
    Conv1d,
    LayerNorm,
    Linear,
    apply_rotary,
    dot_product_attention,
    merge_heads,
    rotary_inv_freq,
    rotary_tables,
    split_heads,
)
from almtok_jax.mapping import Rule, conv1d, conv2d, identity, linear, pointwise_conv

Array = jax.Array

@dataclass(frozen=True)
class MusicFMConfig:
    """Hyper-parameters; the defaults are the released MusicFM-25Hz (1024-d, 12 conformer layers)."""

    sample_rate: int = SAMPLE_RATE
    label_rate: int = 25
    # Mel front end (torchaudio MelSpectrogram defaults behind MusicFM's MelSTFT).
    n_fft: int = 2048
    hop_length: int = 240
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float = 12000.0
    mel_mean: float = 6.768444971712967
    mel_std: float = 18.417922652295623
    # Conv2d subsampling: one (mel stride, time stride) per residual module.
    conv_dim: int = 512
    conv_strides: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))
    # Conformer.
    encoder_dim: int = 1024
    encoder_depth: int = 12
    num_heads: int = 16
    ffn_dim: int = 4096
    depthwise_kernel_size: int = 31
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    output_layers: tuple[int, ...] = (4, 11)

    def __post_init__(self):
        if self.encoder_dim % self.num_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if not self.output_layers or not all(0 <= i <= self.encoder_depth for i in self.output_layers):
            raise ValueError(f"output_layers {self.output_layers} must lie in 0..{self.encoder_depth}")
        if self.depthwise_kernel_size % 2 != 1:
            raise ValueError(f"depthwise_kernel_size must be odd, got {self.depthwise_kernel_size}")

    @property
    def head_dim(self) -> int:
        return self.encoder_dim // self.num_heads

    @property
    def samples_per_frame(self) -> int:
        """Input samples per output frame (960 at 24 kHz / 25 Hz)."""
        return self.sample_rate // self.label_rate

    @property
    def num_blocks(self) -> int:
        """Conformer blocks actually computed: up to the last requested layer."""
        return min(max(self.output_layers), self.encoder_depth)

    @property
    def uses_final_norm(self) -> bool:
        """Whether the encoder-level LayerNorm (layer result ``encoder_depth``) is requested."""
        return self.encoder_depth in self.output_layers


def trimmed_length(n: int, config: MusicFMConfig) -> int:
    """Samples kept from an ``n``-sample input: a whole number of output frames (``floor(n/960)*960``)."""
    return n // config.samples_per_frame * config.samples_per_frame


def num_output_frames(n: int, config: MusicFMConfig) -> int:
    """25 Hz output frames for an ``n``-sample input: ``floor(n/960)``."""
    return n // config.samples_per_frame


def min_input_length(config: MusicFMConfig) -> int:
    """Shortest input: the trimmed signal must be longer than the reflect padding ``n_fft//2``."""
    spf = config.samples_per_frame
    return (config.n_fft // 2 // spf + 1) * spf


def check_musicfm_input(wav: Array, config: MusicFMConfig) -> None:
    """Raise a ``ValueError`` naming the problem if ``wav`` is not a usable ``(B, N)`` 24 kHz batch."""
    if wav.ndim != 2:
        raise ValueError(f"MusicFM expects mono audio of shape (B, N) at {config.sample_rate} Hz, "
                         f"got shape {tuple(wav.shape)}")
    n, shortest = wav.shape[1], min_input_length(config)
    if n < shortest:
        raise ValueError(f"MusicFM input too short: {n} samples; needs at least {shortest} samples "
                         f"({shortest / config.sample_rate * 1000:.0f} ms at {config.sample_rate} Hz)")


class MelFrontEnd(nn.Module):
    """Trimmed audio ``(B, Ntr)`` -> mel in dB ``(B, Ntr/hop, n_mels)`` at 100 Hz, float32.

    Centred (reflect-padded) STFT with the ``window`` buffer, power 2, the ``fb`` buffer, then
    ``10*log10(max(., 1e-10))``. Only ``Ntr/hop`` frames are computed: the reference drops the last one.
    """

    config: MusicFMConfig

    @nn.compact
    def __call__(self, wav: Array) -> Array:
        c = self.config
        window = self.variable("buffers", "window", lambda: jnp.asarray(hann_window(c.n_fft))).value
        fb = self.variable("buffers", "fb", lambda: jnp.asarray(mel_filters(
            c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max, scale="htk", norm=None))).value
        half = c.n_fft // 2
        padded = jnp.pad(wav.astype(jnp.float32), ((0, 0), (half, half)), mode="reflect")
        n_frames = wav.shape[1] // c.hop_length
        index = np.arange(n_frames)[:, None] * c.hop_length + np.arange(c.n_fft)[None, :]
        frames = padded[:, index] * window
        spectrum = jnp.fft.rfft(frames, axis=-1)
        power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
        mel = jnp.einsum("btf,fm->btm", power, fb, precision=jax.lax.Precision.HIGHEST)
        return 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))


class Res2dModule(nn.Module):
    """Residual Conv2d block on NHWC ``(B, mel, time, C)``.

    ``ReLU(shortcut(x) + BN(conv2(ReLU(BN(conv1(x))))))``; the shortcut is ``BN(conv3(x))`` when the block
    changes width or strides in mel, else ``x``.
    """

    features: int
    strides: tuple[int, int]
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def conv(name, strides):
            return nn.Conv(self.features, (3, 3), strides=strides, padding=((1, 1), (1, 1)), name=name)

        def bn(name):
            return nn.BatchNorm(use_running_average=True, epsilon=self.eps, name=name)

        out = nn.relu(bn("bn1")(conv("conv1", self.strides)(x)))
        out = bn("bn2")(conv("conv2", (1, 1))(out))
        if x.shape[-1] != self.features or self.strides[0] > 1:
            x = bn("bn3")(conv("conv3", self.strides)(x))
        return nn.relu(x + out)


class Conv2dSubsampling(nn.Module):
    """Normalised mel ``(B, T4, n_mels)`` -> ``(B, T, encoder_dim)``, and the conv map ``(B, F', T, C)``."""

    config: MusicFMConfig

    @nn.compact
    def __call__(self, mel: Array) -> tuple[Array, Array]:
        c = self.config
        x = jnp.swapaxes(mel, 1, 2)[..., None]  # NHWC with H = mel band, W = time
        for i, strides in enumerate(c.conv_strides):
            x = Res2dModule(c.conv_dim, tuple(strides), c.batch_norm_eps, name=f"conv_{i}")(x)
        b, f, t, ch = x.shape
        flat = jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, ch * f)  # feature index c*F' + f
        return Linear(c.encoder_dim, name="linear")(flat), x


class ConformerFeedForward(nn.Module):
    """Linear -> SiLU -> Linear."""

    config: MusicFMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.silu(Linear(self.config.ffn_dim, name="intermediate_dense")(x))
        return Linear(self.config.encoder_dim, name="output_dense")(h)


class RotarySelfAttention(nn.Module):
    """HF Wav2Vec2-Conformer rotary self-attention: q and k see the *rotated* input, v the unrotated one."""

    config: MusicFMConfig

    @nn.compact
    def __call__(self, h: Array, cos: Array, sin: Array) -> Array:
        c = self.config
        h_rot = merge_heads(apply_rotary(split_heads(h, c.num_heads), cos, sin))

        def project(name: str, x: Array) -> Array:
            return split_heads(Linear(c.encoder_dim, name=name)(x), c.num_heads)

        q, k, v = project("linear_q", h_rot), project("linear_k", h_rot), project("linear_v", h)
        return Linear(c.encoder_dim, name="linear_out")(merge_heads(dot_product_attention(q, k, v)))


class ConvModule(nn.Module):
    """LN -> pointwise (D->2D) -> GLU -> depthwise conv -> BatchNorm (running stats) -> SiLU -> pointwise."""

    config: MusicFMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = LayerNorm(c.layer_norm_eps, name="layer_norm")(x)
        h = Linear(2 * c.encoder_dim, use_bias=False, name="pointwise_conv1")(h)
        h = h[..., : c.encoder_dim] * jax.nn.sigmoid(h[..., c.encoder_dim:])
        h = Conv1d(c.encoder_dim, c.depthwise_kernel_size, groups=c.encoder_dim,
                   padding=c.depthwise_kernel_size // 2, use_bias=False, name="depthwise_conv")(h)
        h = nn.BatchNorm(use_running_average=True, epsilon=c.batch_norm_eps, name="batch_norm")(h)
        return Linear(c.encoder_dim, use_bias=False, name="pointwise_conv2")(nn.silu(h))


class ConformerBlock(nn.Module):
    """Macaron conformer block ``(B, T, D) -> (B, T, D)``.

    Scan body: ``(x, cos, sin) -> (x, x)``; the rotary tables are shared (broadcast), the output is kept
    per layer (a layer result).
    """

    config: MusicFMConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        c = self.config

        def norm(name):
            return LayerNorm(c.layer_norm_eps, name=name)

        x = x + 0.5 * ConformerFeedForward(c, name="ffn1")(norm("ffn1_layer_norm")(x))
        x = x + RotarySelfAttention(c, name="self_attn")(norm("self_attn_layer_norm")(x), cos, sin)
        x = x + ConvModule(c, name="conv_module")(x)
        x = x + 0.5 * ConformerFeedForward(c, name="ffn2")(norm("ffn2_layer_norm")(x))
        x = norm("final_layer_norm")(x)
        return x, x


class Conformer(nn.Module):
    """``x0 (B, T, D)`` -> layer results ``0..num_blocks`` stacked ``(num_blocks + 1, B, T, D)``.

    Result ``i`` is the output of block ``i-1``, except result ``encoder_depth``, which is the encoder
    LayerNorm of the last block's output.
    """

    config: MusicFMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        inv_freq = self.variable("buffers", "inv_freq",
                                 lambda: jnp.asarray(rotary_inv_freq(c.head_dim, c.rotary_base))).value
        cos, sin = rotary_tables(inv_freq, x.shape[1])
        results = [x[None]]
        if c.num_blocks:
            blocks = nn.scan(ConformerBlock, variable_axes={"params": 0, "batch_stats": 0},
                             split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                             length=c.num_blocks)(c, name="layers")
            last, outputs = blocks(x, cos, sin)
            if c.uses_final_norm:  # the last block's output is only seen through the encoder LayerNorm
                outputs = jnp.concatenate(
                    [outputs[:-1], LayerNorm(c.layer_norm_eps, name="layer_norm")(last)[None]], axis=0)
            results.append(outputs)
        return jnp.concatenate(results, axis=0)


class MusicFM(nn.Module):
    """24 kHz audio ``(B, N)`` -> the requested layer results, a tuple of ``(B, floor(N/960), D)`` at 25 Hz.

    Sows ``mel_db``/``mel_norm`` ``(B, 4T, n_mels)`` and ``conv2d`` ``(B, F', T, C)`` into ``intermediates``.
    """

    config: MusicFMConfig

    @nn.compact
    def __call__(self, wav: Array) -> tuple[Array, ...]:
        c = self.config
        check_musicfm_input(wav, c)
        wav = wav[:, : trimmed_length(wav.shape[1], c)]
        mel_db = MelFrontEnd(c, name="mel_stft")(wav)
        mel_norm = (mel_db - c.mel_mean) / c.mel_std
        x0, conv_map = Conv2dSubsampling(c, name="conv")(mel_norm)
        results = Conformer(c, name="conformer")(x0)
        self.sow("intermediates", "mel_db", mel_db)
        self.sow("intermediates", "mel_norm", mel_norm)
        self.sow("intermediates", "conv2d", conv_map)
        return tuple(results[i] for i in c.output_layers)


# torch sub-key of a conformer block -> (collection, Flax sub-path, transform)
_BLOCK_KEYS: dict[str, tuple[str, str, object]] = {
    **{f"{ln}.{w}": ("params", f"{ln.replace('.', '/')}/{f}", identity)
       for ln in ("ffn1_layer_norm", "self_attn_layer_norm", "conv_module.layer_norm", "ffn2_layer_norm",
                  "final_layer_norm")
       for w, f in (("weight", "scale"), ("bias", "bias"))},
    **{f"{ffn}.{dense}.weight": ("params", f"{ffn}/{dense}/kernel", linear)
       for ffn in ("ffn1", "ffn2") for dense in ("intermediate_dense", "output_dense")},
    **{f"{ffn}.{dense}.bias": ("params", f"{ffn}/{dense}/bias", identity)
       for ffn in ("ffn1", "ffn2") for dense in ("intermediate_dense", "output_dense")},
    **{f"self_attn.linear_{p}.weight": ("params", f"self_attn/linear_{p}/kernel", linear) for p in "qkv"},
    **{f"self_attn.linear_{p}.bias": ("params", f"self_attn/linear_{p}/bias", identity) for p in "qkv"},
    "self_attn.linear_out.weight": ("params", "self_attn/linear_out/kernel", linear),
    "self_attn.linear_out.bias": ("params", "self_attn/linear_out/bias", identity),
    "conv_module.pointwise_conv1.weight": ("params", "conv_module/pointwise_conv1/kernel", pointwise_conv),
    "conv_module.depthwise_conv.weight": ("params", "conv_module/depthwise_conv/kernel", conv1d),
    "conv_module.batch_norm.weight": ("params", "conv_module/batch_norm/scale", identity),
    "conv_module.batch_norm.bias": ("params", "conv_module/batch_norm/bias", identity),
    "conv_module.batch_norm.running_mean": ("batch_stats", "conv_module/batch_norm/mean", identity),
    "conv_module.batch_norm.running_var": ("batch_stats", "conv_module/batch_norm/var", identity),
    "conv_module.pointwise_conv2.weight": ("params", "conv_module/pointwise_conv2/kernel", pointwise_conv),
}


def musicfm_rules(config: MusicFMConfig) -> list[Rule]:
    """Rules for the MusicFM25Hz state dict (keys relative to :data:`MUSICFM`'s key prefix).

    Blocks beyond the last requested layer, the encoder LayerNorm (unless layer ``encoder_depth`` is
    requested), the unused positional conv, the BEST-RQ quantizer, the logits head, ``cls_token`` and
    every ``num_batches_tracked`` are dropped on purpose.
    """
    rules = [
        Rule(r".*\.num_batches_tracked", None),
        Rule(r"preprocessor_melspec_2048\.mel_stft\.spectrogram\.window", "buffers/mel_stft/window"),
        Rule(r"preprocessor_melspec_2048\.mel_stft\.mel_scale\.fb", "buffers/mel_stft/fb"),
        Rule(r"conformer\.embed_positions\.inv_freq", "buffers/conformer/inv_freq"),
        Rule(r"conv\.linear\.weight", "params/conv/linear/kernel", linear),
        Rule(r"conv\.linear\.bias", "params/conv/linear/bias"),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<c>conv[123])\.weight", "params/conv/conv_{m}/{c}/kernel", conv2d),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<c>conv[123])\.bias", "params/conv/conv_{m}/{c}/bias"),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<n>bn[123])\.weight", "params/conv/conv_{m}/{n}/scale"),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<n>bn[123])\.bias", "params/conv/conv_{m}/{n}/bias"),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<n>bn[123])\.running_mean", "batch_stats/conv/conv_{m}/{n}/mean"),
        Rule(r"conv\.conv\.(?P<m>\d+)\.(?P<n>bn[123])\.running_var", "batch_stats/conv/conv_{m}/{n}/var"),
    ]
    if config.num_blocks:
        needed = "|".join(str(i) for i in range(config.num_blocks))
        for sub, (collection, path, transform) in _BLOCK_KEYS.items():
            rules.append(Rule(rf"conformer\.layers\.(?P<i>{needed})\.{re.escape(sub)}",
                              f"{collection}/conformer/layers/{path}", transform, stack="i"))
    if config.uses_final_norm:
        rules += [Rule(r"conformer\.layer_norm\.weight", "params/conformer/layer_norm/scale"),
                  Rule(r"conformer\.layer_norm\.bias", "params/conformer/layer_norm/bias")]
    rules += [
        Rule(r"conformer\.layers\.\d+\..+", None),  # blocks after the last requested layer
        Rule(r"conformer\.layer_norm\.(weight|bias)", None),
        Rule(r"conformer\.pos_conv_embed\.conv\.(bias|weight_g|weight_v)", None),
        Rule(r"quantizer_melspec_2048\.(random_projection|codebook)", None),
        Rule(r"linear\.(weight|bias)", None),
        Rule(r"cls_token", None),
    ]
    return rules


def with_output_layers(config: MusicFMConfig, layers: tuple[int, ...]) -> MusicFMConfig:
    """The same model returning other layer results (e.g. ``range(encoder_depth + 1)`` for all of them)."""
    return dataclasses.replace(config, output_layers=tuple(layers))


# Fresh variables: random params, Hann window, HTK filter bank, running statistics 0/1.
def derive_musicfm(key_shapes: KeyShapes, base: MusicFMConfig, files: ReleaseFiles) -> MusicFMConfig:
    """Sizes from the MusicFM25Hz shapes (no release file states them): widths, depth, heads (from the
    rotary ``inv_freq`` length = head_dim / 2), depthwise kernel, ``n_fft`` / ``n_mels`` (mel window and
    filter bank); rates, strides, mel statistics, epsilons and output layers from ``base``."""
    del files

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(key_shapes, key, "musicfm")

    modules = layer_indices(key_shapes, "conv.conv.")
    if len(modules) != len(base.conv_strides):
        raise DeriveError(f"musicfm: {len(modules)} conv subsampling modules in the checkpoint, but their strides "
                          f"are known only for {len(base.conv_strides)} (conv_strides {base.conv_strides})")
    encoder_dim = shape("conv.linear.weight")[0]
    layer = "conformer.layers.0."
    return dataclasses.replace(
        base, conv_dim=shape("conv.conv.0.conv1.weight")[0], encoder_dim=encoder_dim,
        encoder_depth=len(layer_indices(key_shapes, "conformer.layers.")),
        num_heads=encoder_dim // (2 * shape("conformer.embed_positions.inv_freq")[0]),
        ffn_dim=shape(layer + "ffn1.intermediate_dense.weight")[0],
        depthwise_kernel_size=shape(layer + "conv_module.depthwise_conv.weight")[2],
        n_fft=shape("preprocessor_melspec_2048.mel_stft.spectrogram.window")[0],
        n_mels=shape("preprocessor_melspec_2048.mel_stft.mel_scale.fb")[1])


MUSICFM = Component(
    "musicfm", frozen=True, config_path="experts.musicfm", module=MusicFM,
    example_inputs=lambda m: shapes((1, min_input_length(m))), rules=musicfm_rules,
    key_prefix="pretrained_model.model.model.", derive=derive_musicfm)
