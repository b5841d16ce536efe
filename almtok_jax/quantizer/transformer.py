"""The query transformer block of ALMTokenizer2 (upstream ``modules/transformer.py``, spec 02 §3).

The configuration used everywhere in the model (``power_normalized=True``): no block LayerNorms, every
linear weight-normed (``g``/``v`` recombined on each forward pass), fused ``to_qkv`` with per-head qk
LayerNorm (eps 1e-5, affine), partial rotary embedding (rotate-half pairing on the first ``rope_dim`` dims
of each head, positions ``0..L-1``), unmasked softmax attention, a sigmoid-gated GLU feed-forward, and a
LayerScale on both residual branches. Stacks of identical blocks run under ``nn.scan`` with parameters
stacked on a leading layer axis. Shapes are channels-last ``(B, L, dim)``; the block does not change the
rate of its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax import layers, mapping
from almtok_jax.mapping import Rule

Array = jax.Array


@dataclass(frozen=True)
class BlockConfig:
    """One ``TransformerBlock`` (released: width 768, 6 heads of 128, RoPE on 64 dims, FF inner 3072)."""

    dim: int = 768
    dim_heads: int = 128
    ff_mult: int = 4
    qk_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int | None = None  # None: upstream's rule max(dim_heads // 2, 32)
    layer_scale_init: float = 0.01

    def __post_init__(self):
        if self.dim % self.dim_heads:
            raise ValueError(f"width {self.dim} is not a multiple of dim_heads {self.dim_heads}")
        if self.rotary_dim > self.dim_heads or self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} must be even and at most dim_heads "
                             f"{self.dim_heads} (upstream uses max(dim_heads // 2, 32))")

    @property
    def heads(self) -> int:
        return self.dim // self.dim_heads

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim if self.rope_dim is not None else max(self.dim_heads // 2, 32)

    @property
    def ff_inner(self) -> int:
        return self.dim * self.ff_mult


def rope_inv_freq(config: BlockConfig) -> np.ndarray:
    """The ``rope.inv_freq`` buffer ``(rotary_dim/2,)``: ``1 / base^(2k/rotary_dim)`` in float32."""
    return layers.rotary_inv_freq(config.rotary_dim, config.rope_base)


def check_rope_buffers(state_dict: dict, config: BlockConfig) -> None:
    """Raise if a checkpoint's ``*.rope.inv_freq`` buffer is not :func:`rope_inv_freq` up to float32
    rounding (:func:`~almtok_jax.layers.check_derived_buffer`).

    The buffer is a constant of the architecture; the model recomputes it (as torch does, so it equals the
    released buffers bit for bit), and a checkpoint with another rotary base or dim must not load silently.
    """
    want = rope_inv_freq(config)
    for key, value in state_dict.items():
        if key.endswith("rope.inv_freq"):
            layers.check_derived_buffer(key, np.asarray(value), want,
                                        f"the RoPE table of the config (rotary_dim {config.rotary_dim}, "
                                        f"base {config.rope_base})")


class QKNormRotaryAttention(nn.Module):
    """Fused weight-normed qkv (no bias) → qk LayerNorm → RoPE → softmax attention → weight-normed out."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        length = x.shape[1]
        qkv = layers.Linear(3 * c.dim, use_bias=False, use_weight_norm=True, name="to_qkv")(x)
        q, k, v = (layers.split_heads(a, c.heads) for a in jnp.split(qkv, 3, axis=-1))
        q = layers.layer_norm(q, c.qk_norm_eps, self.param("q_norm_scale", nn.initializers.ones, (c.dim_heads,)),
                       self.param("q_norm_bias", nn.initializers.zeros, (c.dim_heads,)))
        k = layers.layer_norm(k, c.qk_norm_eps, self.param("k_norm_scale", nn.initializers.ones, (c.dim_heads,)),
                       self.param("k_norm_bias", nn.initializers.zeros, (c.dim_heads,)))
        cos, sin = layers.rotary_tables(rope_inv_freq(c), length)
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        o = layers.merge_heads(layers.dot_product_attention(q, k, v))
        return layers.Linear(c.dim, use_bias=False, use_weight_norm=True, name="to_out")(o)


class GatedFeedForward(nn.Module):
    """``W2 (value * sigmoid(gate)) + b2`` with ``[value | gate] = W1 x + b1``; both linears weight-normed."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        inner = self.config.ff_inner
        h = layers.Linear(2 * inner, use_weight_norm=True, name="proj")(x)
        u = h[..., :inner] * jax.nn.sigmoid(h[..., inner:])
        return layers.Linear(self.config.dim, use_weight_norm=True, name="out")(u)


class TransformerBlock(nn.Module):
    """``x + s_a * Attn(x)`` then ``x + s_f * FF(x)``; no norms on the residual stream. ``(B, L, dim)``.

    Scan body: ``x -> (x, None)`` (no per-layer output is kept).
    """

    config: BlockConfig

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, None]:
        c = self.config
        scale_init = nn.initializers.constant(c.layer_scale_init)
        x = x + self.param("self_attn_scale", scale_init, (c.dim,)) * QKNormRotaryAttention(c, name="self_attn")(x)
        return x + self.param("ff_scale", scale_init, (c.dim,)) * GatedFeedForward(c, name="ff")(x), None


class TransformerStack(nn.Module):
    """``depth`` blocks applied in order (``nn.scan``; parameters stacked under ``blocks`` on axis 0)."""

    config: BlockConfig
    depth: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        blocks = nn.scan(TransformerBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth)(self.config, name="blocks")
        return blocks(x)[0]


def transformer_stack_rules() -> list[Rule]:
    """Keys of an ``nn.Sequential`` of blocks, relative to its prefix (``encoder_transformers.``).

    ``{i}.rope.inv_freq`` is dropped here: it is a constant, checked by :func:`check_rope_buffers`.
    """
    p = "params/blocks/"
    layer = r"(?P<i>\d+)\."
    rules = [Rule(layer + r"rope\.inv_freq", None)]
    for src, dst in (("self_attn.to_qkv", "self_attn/to_qkv"), ("self_attn.to_out", "self_attn/to_out"),
                     ("ff.ff.0.proj", "ff/proj"), ("ff.ff.2", "ff/out")):
        rules += [Rule(layer + src.replace(".", r"\.") + r"\.weight_v", p + dst + "/weight_v",
                       mapping.linear, stack="i"),
                  Rule(layer + src.replace(".", r"\.") + r"\.weight_g", p + dst + "/weight_g",
                       mapping.to_vector, stack="i")]
    for src, dst in (("ff.ff.0.proj.bias", "ff/proj/bias"), ("ff.ff.2.bias", "ff/out/bias"),
                     ("self_attn.q_norm.weight", "self_attn/q_norm_scale"),
                     ("self_attn.q_norm.bias", "self_attn/q_norm_bias"),
                     ("self_attn.k_norm.weight", "self_attn/k_norm_scale"),
                     ("self_attn.k_norm.bias", "self_attn/k_norm_bias"),
                     ("self_attn_scale.scale", "self_attn_scale"), ("ff_scale.scale", "ff_scale")):
        rules.append(Rule(layer + src.replace(".", r"\."), p + dst, stack="i"))
    return rules
