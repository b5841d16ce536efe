"""Optional GPT loss: a small causal transformer that predicts the next token's codes (experimental).

Upstream's ``use_gpt_loss`` option cannot be built and is never wired into the loss (spec 02 §5, §7), and
the release has no weights for it. This module is this project's own, clearly separate take on the idea:
from the quantized sequence ``z (B, N, dim)`` at 12.5 Hz, a pre-LN causal transformer predicts at each
position ``t`` the ``Q`` codes of token ``t + 1``; the loss is the cross-entropy averaged over codebooks
and positions. It is off by default; ``quantizer.gpt_loss.enabled=true`` adds it (times ``weight``) to the
training loss, with the predictor as the ``gpt`` component of the trainable parameters. It is not part of
the release checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from almtok_jax.component import Component, shapes
from almtok_jax.layers import LayerNorm, Linear, dot_product_attention, gelu_exact, merge_heads, split_heads

Array = jax.Array


@dataclass(frozen=True)
class GPTLossConfig:
    """Size of the code predictor (upstream's ``GPTC_XXS`` widths by default) and the loss weight."""

    enabled: bool = False
    layers: int = 6
    heads: int = 4
    width: int = 768
    max_len: int = 1024
    weight: float = 1.0
    # False: the loss also shapes the quantized sequence (its purpose: tokens an LM predicts more easily);
    # True: it only trains the predictor (a probe of how predictable the codes are).
    stop_gradient_input: bool = False


class _CausalBlock(nn.Module):
    """Pre-LN block: ``h + Attn(LN(h))`` (causal), then ``h + MLP(LN(h))`` with exact GELU.

    Scan body: ``h -> (h, None)`` (no per-layer output is kept).
    """

    width: int
    heads: int

    @nn.compact
    def __call__(self, h: Array) -> tuple[Array, None]:
        n = h.shape[1]
        x = LayerNorm(name="ln1")(h)
        q, k, v = (split_heads(Linear(self.width, name=nm)(x), self.heads) for nm in ("query", "key", "value"))
        causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
        h = h + Linear(self.width, name="proj")(merge_heads(dot_product_attention(q, k, v, mask=causal)))
        x = LayerNorm(name="ln2")(h)
        return h + Linear(self.width, name="mlp_out")(gelu_exact(Linear(4 * self.width, name="mlp_in")(x))), None


class CodePredictor(nn.Module):
    """``z (B, N, dim)`` → next-token code logits ``(B, N, Q, K)`` (position t predicts token t+1); the
    ``layers`` blocks run under ``nn.scan`` (parameters stacked under ``blocks`` on axis 0)."""

    config: GPTLossConfig
    num_quantizers: int
    codebook_size: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        c = self.config
        n = z.shape[1]
        if n > c.max_len:
            raise ValueError(f"GPT loss: {n} tokens exceed max_len {c.max_len}")
        pos = self.param("pos_emb", nn.initializers.normal(0.02), (c.max_len, c.width))
        h = Linear(c.width, name="input_proj")(z) + pos[:n]
        blocks = nn.scan(_CausalBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=c.layers)(c.width, c.heads, name="blocks")
        h = blocks(h)[0]
        logits = Linear(self.num_quantizers * self.codebook_size, name="head")(LayerNorm(name="ln_f")(h))
        return logits.reshape(*z.shape[:2], self.num_quantizers, self.codebook_size)


def code_predictor(config) -> CodePredictor:
    """The predictor of a :class:`~almtok_jax.quantizer.query.QuantizerConfig` (its codebook sizes)."""
    return CodePredictor(config.gpt_loss, config.rvq.num_quantizers, config.rvq.codebook_size)


def next_code_loss(logits: Array, codes: Array) -> Array:
    """Cross-entropy of ``logits (B, N, Q, K)`` at positions ``0..N-2`` against ``codes (B, N, Q)`` at
    ``1..N-1``, averaged over batch, positions and codebooks."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], codes[:, 1:]))


def gpt_loss(predictor: CodePredictor, params: dict, z: Array, codes: Array) -> Array:
    """The weighted next-code loss of ``predictor`` on quantized tokens ``z`` and their ``codes``."""
    if predictor.config.stop_gradient_input:
        z = jax.lax.stop_gradient(z)
    return predictor.config.weight * next_code_loss(predictor.apply({"params": params}, z), codes)


# Only training makes it (no reference weights), and only with ``quantizer.gpt_loss.enabled``.
GPT = Component(
    "gpt", frozen=False, config_path="quantizer", module=code_predictor,
    example_inputs=lambda q: shapes((1, 2, q.dim)), rules=lambda q: [], source=None,
    enabled=lambda c: c.quantizer.gpt_loss.enabled)
