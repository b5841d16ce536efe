"""Pronunciation decoder and phone reconstruction loss (upstream ``models/semantic_decoder.py``, spec 02 §6).

A small conv decoder (training-only branch) turns the quantized tokens ``(B, N, dim)`` at 12.5 Hz into a
prediction ``(B, 4N, output_channels)`` of the WavLM features at 50 Hz (×2 per transposed-conv block):
``conv1`` (k 3, no bias) → per stride: ConvTranspose1d (k = 2·stride, bias) + residual units
``x + conv2(ELU(conv1(ELU(x))))`` (conv1 k 3 dilated, conv2 k 1, no biases) → ``conv2`` (k 3, no bias).
No norms. Channels-last inside; the reference is channels-first.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from almtok_jax import mapping
from almtok_jax.layers import Conv1d, ConvTranspose1d
from almtok_jax.mapping import Rule

Array = jax.Array


@dataclass(frozen=True)
class PronunciationConfig:
    """``Decoder(code_dim=dim, output_channels, decode_channels, strides)`` with the upstream defaults
    (channel ratios 1, so every inner conv has ``decode_channels``); released: 768 / 768 / (2, 2)."""

    output_channels: int = 768
    decode_channels: int = 768
    strides: tuple[int, ...] = (2, 2)
    kernel_size: int = 3
    unit_kernel_size: int = 3
    block_dilations: tuple[int, ...] = (1, 1)
    elu_alpha: float = 1.0
    loss_weight: float = 0.5

    @property
    def upsampling(self) -> int:
        out = 1
        for s in self.strides:
            out *= s
        return out


class ELUResidualUnit(nn.Module):
    """``x + conv2(ELU(conv1(ELU(x))))``, both convs without bias; length preserved."""

    channels: int
    kernel_size: int
    dilation: int
    elu_alpha: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = self.dilation * (self.kernel_size - 1) // 2
        y = Conv1d(self.channels, self.kernel_size, dilation=self.dilation, padding=pad, use_bias=False,
                   name="conv1")(jax.nn.elu(x, self.elu_alpha))
        y = Conv1d(self.channels, 1, use_bias=False, name="conv2")(jax.nn.elu(y, self.elu_alpha))
        return x + y


class PronunciationDecoder(nn.Module):
    """Quantized tokens ``(B, N, dim)`` → WavLM-feature prediction ``(B, N·Πstrides, output_channels)``."""

    config: PronunciationConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        c = self.config
        pad = (c.kernel_size - 1) // 2
        x = Conv1d(c.decode_channels, c.kernel_size, padding=pad, use_bias=False, name="conv1")(z)
        for i, stride in enumerate(c.strides):
            # kernel 2s, padding ceil(s/2), output padding s mod 2: exactly s times longer.
            x = ConvTranspose1d(c.decode_channels, 2 * stride, stride=stride, padding=(stride + 1) // 2,
                                output_padding=stride % 2, name=f"block{i}_deconv")(x)
            for j, dilation in enumerate(c.block_dilations):
                x = ELUResidualUnit(c.decode_channels, c.unit_kernel_size, dilation, c.elu_alpha,
                                 name=f"block{i}_res{j}")(x)
        return Conv1d(c.output_channels, c.kernel_size, padding=pad, use_bias=False, name="conv2")(x)


def phone_loss(pred: Array, target: Array) -> Array:
    """``mean((target[:, :n] - pred[:, :n])^2)`` with ``n = min(T_w, 4N)``; both ``(B, time, C)``."""
    if pred.shape[0] != target.shape[0] or pred.shape[-1] != target.shape[-1]:
        raise ValueError(f"phone target {target.shape} does not match the prediction {pred.shape} "
                         "(expected (B, time, channels), channels-last)")
    n = min(pred.shape[1], target.shape[1])
    return jnp.mean(jnp.square(target[:, :n].astype(jnp.float32) - pred[:, :n]))


def pronunciation_rules(config: PronunciationConfig) -> list[Rule]:
    """``pronunciation_decoder.*`` keys relative to the prefix."""
    rules = [Rule(r"conv1\.conv\.weight", "params/conv1/kernel", mapping.conv1d),
             Rule(r"conv2\.conv\.weight", "params/conv2/kernel", mapping.conv1d)]
    for i in range(len(config.strides)):
        block = rf"conv_blocks\.{i}\."
        rules += [Rule(block + r"conv\.deconv\.weight", f"params/block{i}_deconv/kernel",
                       mapping.conv_transpose1d),
                  Rule(block + r"conv\.deconv\.bias", f"params/block{i}_deconv/bias")]
        for j in range(len(config.block_dilations)):
            unit = block + rf"res_units\.{j}\."
            target = f"params/block{i}_res{j}/"
            rules += [Rule(unit + r"conv1\.conv\.weight", target + "conv1/kernel", mapping.conv1d),
                      Rule(unit + r"conv2\.weight", target + "conv2/kernel", mapping.conv1d)]
    return rules
