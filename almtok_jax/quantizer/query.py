"""The query-based quantizer of ALMTokenizer2 (spec 02 §0–§2, §8): 25 Hz features → 12.5 Hz codes → 25 Hz
DiT condition.

Encoder: a learned query token (``cls_token``) after every ``interval`` frames, the encoder transformer
stack over the interleaved sequence, keep the query slots (``B, T/interval, dim``). The residual VQ turns
them into codes ``(B, N, Q)``. Decoder: ``interval`` learned ``mask_token`` placeholders before every
quantized token, the decoder stack, keep the placeholder slots (``B, interval·N, dim``), then
``decoder_pred`` and ``cond_feature_emb`` (two linears). A pronunciation decoder predicts WavLM features
from the quantized tokens during training.

Frame counts not divisible by ``interval``: upstream crashes. With the runtime choice ``compat="release"``
(an argument of :class:`QueryQuantizer` and :func:`fit_frames`, never a config field) they raise a ``ValueError``; the
default mode pads the features by repeating the last frame up to the next multiple of ``interval``
(so ``N = ceil(T / interval)`` tokens, and the condition has ``interval·N`` frames; callers keep the
first ``T``).

Variables: ``params`` (everything trainable) and ``codebook`` (the RVQ buffers, updated by the training
forward, never by the optimizer). Load released weights with :data:`QUANTIZER` (``.load``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax import mapping
from almtok_jax.compat import Compat, check_compat
from almtok_jax.component import Component, DeriveError, KeyShapes, ReleaseFiles, layer_indices, shape_of, shapes
from almtok_jax.layers import Linear
from almtok_jax.mapping import Rule, prefixed
from almtok_jax.quantizer.gpt import GPTLossConfig
from almtok_jax.quantizer.pronunciation import (
    PronunciationConfig,
    PronunciationDecoder,
    phone_loss,
    pronunciation_rules,
)
from almtok_jax.quantizer.rvq import ResidualVQ, RVQConfig, rvq_rules
from almtok_jax.quantizer.transformer import (
    BlockConfig,
    TransformerStack,
    check_rope_buffers,
    transformer_stack_rules,
)

Array = jax.Array


@dataclass(frozen=True)
class QuantizerConfig:
    """Every hyper-parameter of the quantizer part; defaults = the released model."""

    block: BlockConfig = field(default_factory=BlockConfig)
    encoder_depth: int = 6
    decoder_depth: int = 8
    interval: int = 2
    rvq: RVQConfig = field(default_factory=RVQConfig)
    pronunciation: PronunciationConfig = field(default_factory=PronunciationConfig)
    gpt_loss: GPTLossConfig = field(default_factory=GPTLossConfig)

    def __post_init__(self):
        if self.rvq.dim != self.block.dim:
            raise ValueError(f"RVQ dim {self.rvq.dim} differs from the transformer width {self.block.dim}")

    @property
    def dim(self) -> int:
        return self.block.dim


def interleave_queries(features: Array, query: Array, interval: int) -> Array:
    """``(B, T, D)`` frames → ``(B, T + T/interval, D)``: ``[f0, f1, C, f2, f3, C, ...]`` (T divisible)."""
    b, t, d = features.shape
    groups = features.reshape(b, t // interval, interval, d)
    queries = jnp.broadcast_to(query.astype(features.dtype), (b, t // interval, 1, d))
    return jnp.concatenate([groups, queries], axis=2).reshape(b, -1, d)


def extract_queries(h: Array, interval: int) -> Array:
    """The query slots ``3j+2`` (for interval 2) of ``(B, L, D)`` → ``(B, L/(interval+1), D)``."""
    b, length, d = h.shape
    return h.reshape(b, length // (interval + 1), interval + 1, d)[:, :, interval]


def interleave_masks(tokens: Array, mask: Array, interval: int) -> Array:
    """``(B, N, D)`` tokens → ``(B, (interval+1)·N, D)``: ``[M, M, z0, M, M, z1, ...]``."""
    b, n, d = tokens.shape
    masks = jnp.broadcast_to(mask.astype(tokens.dtype), (b, n, interval, d))
    return jnp.concatenate([masks, tokens[:, :, None]], axis=2).reshape(b, -1, d)


def extract_frames(h: Array, interval: int) -> Array:
    """The non-token slots of ``(B, (interval+1)·N, D)``, in order → ``(B, interval·N, D)``."""
    b, length, d = h.shape
    n = length // (interval + 1)
    return h.reshape(b, n, interval + 1, d)[:, :, :interval].reshape(b, interval * n, d)


def fit_frames(features: Array, config: QuantizerConfig, compat: Compat = "default") -> Array:
    """Check ``(B, T, dim)`` features and apply the frame-count rule of ``compat`` (module docstring)."""
    check_compat(compat)
    if features.ndim != 3 or features.shape[-1] != config.dim:
        raise ValueError(f"quantizer features must be (B, T, {config.dim}), got shape {features.shape}")
    t = features.shape[1]
    if t == 0:
        raise ValueError("quantizer features have no frames")
    extra = -t % config.interval
    if extra and compat == "release":
        raise ValueError(f"{t} feature frames is not a multiple of the query interval {config.interval}; "
                         "the reference cannot tokenize it (compat='release')")
    if extra:
        features = jnp.concatenate([features, jnp.repeat(features[:, -1:], extra, axis=1)], axis=1)
    return features


class LearnedToken(nn.Module):
    """One learned ``(1, dim)`` vector (init N(0, 1)); a submodule so that it is only needed when used."""

    dim: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("embedding", nn.initializers.normal(1.0), (1, self.dim))


class QueryQuantizer(nn.Module):
    """The quantizer part of ``AudioDiffusion1D``; submodules carry the reference's attribute names.
    ``compat`` only decides how odd frame counts are handled (:func:`fit_frames`)."""

    config: QuantizerConfig
    compat: Compat = "default"

    def setup(self):
        c = self.config
        self.cls_token = LearnedToken(c.dim)
        self.mask_token = LearnedToken(c.dim)
        self.encoder_transformers = TransformerStack(c.block, c.encoder_depth)
        self.decoder_transformers = TransformerStack(c.block, c.decoder_depth)
        self.vq_embed = ResidualVQ(c.rvq)
        self.decoder_pred = Linear(c.dim)
        self.cond_feature_emb = Linear(c.dim)
        self.pronunciation_decoder = PronunciationDecoder(c.pronunciation)

    def encoder_sequence(self, features: Array) -> dict[str, Array]:
        """``(B, T, dim)`` 25 Hz → ``enc_in``/``enc_out`` ``(B, L, dim)``, ``query (B, N, dim)`` 12.5 Hz."""
        interval = self.config.interval
        enc_in = interleave_queries(fit_frames(features, self.config, self.compat), self.cls_token(), interval)
        enc_out = self.encoder_transformers(enc_in)
        return {"enc_in": enc_in, "enc_out": enc_out, "query": extract_queries(enc_out, interval)}

    def decoder_sequence(self, quantized: Array) -> dict[str, Array]:
        """``(B, N, dim)`` 12.5 Hz → ``dec_in``/``dec_out``, ``dec_kept``/``decoder_pred``/``cond``
        ``(B, interval·N, dim)`` 25 Hz."""
        interval = self.config.interval
        dec_in = interleave_masks(quantized, self.mask_token(), interval)
        dec_out = self.decoder_transformers(dec_in)
        dec_kept = extract_frames(dec_out, interval)
        decoder_pred = self.decoder_pred(dec_kept)
        return {"dec_in": dec_in, "dec_out": dec_out, "dec_kept": dec_kept, "decoder_pred": decoder_pred,
                "cond": self.cond_feature_emb(decoder_pred)}

    def lookup(self, codes: Array) -> Array:
        """Codes ``(B, N, Q)`` → quantized tokens ``(B, N, dim)`` (``get_output_from_indices``)."""
        return self.vq_embed.lookup(codes)

    def pronounce(self, quantized: Array) -> Array:
        """Quantized tokens ``(B, N, dim)`` → WavLM prediction ``(B, 4N, C)`` at 50 Hz."""
        return self.pronunciation_decoder(quantized)

    def __call__(self, features: Array, train: bool = False, key: Array | None = None,
                 wavlm_target: Array | None = None) -> dict[str, Array]:
        """The whole chain (spec 02 §0). ``train`` selects the RVQ training forward (EMA update, dead codes
        from ``key``, rotation trick, commitment losses); eval gives exact codes and zero losses.

        Returns every intermediate, ``codes (B, N, Q)``, ``quantized``, ``vq_losses (Q,)``,
        ``commit_loss`` (their mean), ``pron_pred (B, 4N, C)``, ``cond (B, 2N, dim)`` and, with a
        channels-last ``wavlm_target (B, T_w, C)``, ``phone_loss``.
        """
        out = self.encoder_sequence(features)
        vq = self.vq_embed(out["query"], train=train, key=key)
        out.update(quantized=vq["quantized"], codes=vq["codes"], vq_losses=vq["losses"],
                   commit_loss=jnp.mean(vq["losses"]), pron_pred=self.pronounce(vq["quantized"]))
        out.update(self.decoder_sequence(vq["quantized"]))
        if wavlm_target is not None:
            out["phone_loss"] = phone_loss(out["pron_pred"], wavlm_target)
        return out

    def encode(self, features: Array) -> dict[str, Array]:
        """Eval: features ``(B, T, dim)`` → ``query (B, N, dim)``, ``codes (B, N, Q)`` int32 and
        ``quantized (B, N, dim)``; the encoder runs once."""
        query = self.encoder_sequence(features)["query"]
        vq = self.vq_embed(query)
        return {"query": query, "codes": vq["codes"], "quantized": vq["quantized"]}

    def encode_codes(self, features: Array) -> tuple[Array, Array]:
        """Eval: features ``(B, T, dim)`` → codes ``(B, N, Q)`` int32 and quantized ``(B, N, dim)``."""
        out = self.encode(features)
        return out["codes"], out["quantized"]

    def dequantize(self, codes: Array) -> Array:
        """Codes ``(B, N, Q)`` → DiT condition ``(B, interval·N, dim)`` at 25 Hz."""
        return self.decoder_sequence(self.lookup(codes))["cond"]


@partial(jax.jit, static_argnames=("config", "compat"))
def encode_codes(variables: dict, features: Array, config: QuantizerConfig,
                 compat: Compat = "default") -> tuple[Array, Array]:
    """Tokenize fused features ``(B, T, dim)`` (25 Hz): codes ``(B, N, Q)`` int32 (12.5 Hz) and the
    quantized tokens ``(B, N, dim)``. ``variables`` holds ``params`` and ``codebook``."""
    return QueryQuantizer(config, compat).apply(variables, features, method="encode_codes")


@partial(jax.jit, static_argnames="config")
def dequantize(variables: dict, codes: Array, config: QuantizerConfig) -> Array:
    """Codes ``(B, N, Q)`` → code vectors → decoder → ``decoder_pred`` → ``cond_feature_emb``:
    the DiT condition ``(B, interval·N, dim)`` at 25 Hz."""
    return QueryQuantizer(config).apply(variables, codes, method="dequantize")


def train_forward(params: dict, codebook: dict, features: Array, config: QuantizerConfig, key: Array,
                  wavlm_target: Array | None = None) -> tuple[dict[str, Array], dict]:
    """Training forward (differentiable in ``params``): the outputs of :meth:`QueryQuantizer.__call__`
    with ``train=True`` and the updated ``codebook`` collection (EMA + dead-code replacement)."""
    out, state = QueryQuantizer(config).apply({"params": params, "codebook": codebook}, features, True, key,
                                              wavlm_target, mutable=["codebook"])
    return out, state["codebook"]


def quantizer_rules(config: QuantizerConfig) -> list[Rule]:
    """Every quantizer key of the ``AudioDiffusion1D`` state dict → ``params`` / ``codebook``."""
    rules = [Rule(token, f"params/{token}/embedding") for token in ("cls_token", "mask_token")]
    for head in ("decoder_pred", "cond_feature_emb"):
        rules += [Rule(rf"{head}\.weight", f"params/{head}/kernel", mapping.linear),
                  Rule(rf"{head}\.bias", f"params/{head}/bias")]
    for stack in ("encoder_transformers", "decoder_transformers"):
        rules += prefixed(f"{stack}.", transformer_stack_rules(), stack)
    rules += prefixed("vq_embed.", rvq_rules(), "vq_embed")
    rules += prefixed("pronunciation_decoder.", pronunciation_rules(config.pronunciation),
                      "pronunciation_decoder")
    return rules


# Top-level names (state-dict prefixes and Flax submodules) of the whole quantizer / of the decode path.
QUANTIZER_PARTS = ("cls_token", "mask_token", "encoder_transformers", "decoder_transformers", "decoder_pred",
                   "cond_feature_emb", "pronunciation_decoder", "vq_embed")
DECODER_PARTS = ("mask_token", "decoder_transformers", "decoder_pred", "cond_feature_emb", "vq_embed")


def check_quantizer_state(state_dict: dict[str, np.ndarray], config: QuantizerConfig, source: str) -> None:
    """The RoPE buffers of the checkpoint must match the config (:func:`check_rope_buffers`)."""
    del source
    check_rope_buffers(state_dict, config.block)


def derive_quantizer(key_shapes: KeyShapes, base: QuantizerConfig, files: ReleaseFiles) -> QuantizerConfig:
    """Sizes from the quantizer's shapes (no release file states them): width (``cond_feature_emb``), depths,
    head size (``q_norm``), rotary dim (``rope.inv_freq``), feed-forward multiple (GLU ``proj`` = 2 x inner),
    RVQ codebooks x size x dim, pronunciation-decoder channels and strides (transposed-conv kernel = 2 x
    stride). Epsilons, the RoPE base, the interval, RVQ training constants and the GPT loss from ``base``."""
    del files

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(key_shapes, key, "quantizer")

    dim = shape("cond_feature_emb.weight")[0]
    block = "encoder_transformers.0."
    dim_heads = shape(block + "self_attn.q_norm.weight")[0]
    rotary_dim = 2 * shape(block + "rope.inv_freq")[0]
    ff_inner = shape(block + "ff.ff.0.proj.weight_v")[0] // 2
    if ff_inner % dim:
        raise DeriveError(f"quantizer: feed-forward inner width {ff_inner} is not a multiple of the width {dim}")
    _, codebook_size, codebook_dim = shape("vq_embed.layers.0._codebook.embed")
    pron = base.pronunciation
    blocks = layer_indices(key_shapes, "pronunciation_decoder.conv_blocks.")
    units = layer_indices(key_shapes, "pronunciation_decoder.conv_blocks.0.res_units.")
    if len(units) != len(pron.block_dilations):
        raise DeriveError(f"quantizer: {len(units)} residual units per pronunciation-decoder block in the "
                          f"checkpoint, but dilations are known only for {len(pron.block_dilations)}")
    return dataclasses.replace(
        base,
        block=dataclasses.replace(base.block, dim=dim, dim_heads=dim_heads, ff_mult=ff_inner // dim,
                                  rope_dim=None if rotary_dim == max(dim_heads // 2, 32) else rotary_dim),
        encoder_depth=len(layer_indices(key_shapes, "encoder_transformers.")),
        decoder_depth=len(layer_indices(key_shapes, "decoder_transformers.")),
        rvq=dataclasses.replace(base.rvq, dim=dim, codebook_size=codebook_size, codebook_dim=codebook_dim,
                                num_quantizers=len(layer_indices(key_shapes, "vq_embed.layers."))),
        pronunciation=dataclasses.replace(
            pron, output_channels=shape("pronunciation_decoder.conv2.conv.weight")[0],
            decode_channels=shape("pronunciation_decoder.conv1.conv.weight")[0],
            kernel_size=shape("pronunciation_decoder.conv1.conv.weight")[2],
            unit_kernel_size=shape("pronunciation_decoder.conv_blocks.0.res_units.0.conv1.conv.weight")[2],
            strides=tuple(shape(f"pronunciation_decoder.conv_blocks.{i}.conv.deconv.weight")[2] // 2
                          for i in blocks)))


# Fresh params (PyTorch-like init) and codebook; ``.load(..., names=DECODER_PARTS)`` loads only what
# :func:`dequantize` needs. The interleaving needs a whole number of query intervals in the dummy input.
QUANTIZER = Component(
    "quantizer", frozen=False, config_path="quantizer", module=QueryQuantizer,
    example_inputs=lambda q: shapes((1, 2 * q.interval, q.dim)), rules=quantizer_rules,
    key_names=QUANTIZER_PARTS, check_state=check_quantizer_state, derive=derive_quantizer)
