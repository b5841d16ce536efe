"""The query-based quantizer of ALMTokenizer2 (spec 02 §0–§2, §8): 25 Hz features → 12.5 Hz codes → 25 Hz
DiT condition.

Encoder: a learned query token (``cls_token``) after every ``interval`` frames, the encoder transformer
stack over the interleaved sequence, keep the query slots (``B, T/interval, dim``). The residual VQ turns
them into codes ``(B, N, Q)``. Decoder: ``interval`` learned ``mask_token`` placeholders before every
quantized token, the decoder stack, keep the placeholder slots (``B, interval·N, dim``), then
``decoder_pred`` and ``cond_feature_emb`` (two linears). A pronunciation decoder predicts WavLM features
from the quantized tokens during training.

Frame counts not divisible by ``interval``: upstream crashes. ``compat="release"`` raises a ``ValueError``;
the default mode pads the features by repeating the last frame up to the next multiple of ``interval``
(so ``N = ceil(T / interval)`` tokens, and the condition has ``interval·N`` frames; callers keep the
first ``T``).

Variables: ``params`` (everything trainable) and ``codebook`` (the RVQ buffers, updated by the training
forward, never by the optimizer). Load released weights with :func:`variables_from_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax import mapping
from almtok_jax.compat import check_compat
from almtok_jax.layers import Linear
from almtok_jax.mapping import Rule, convert_state_dict, prefixed
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
    compat: str = "default"  # "release": odd frame counts raise, as upstream

    def __post_init__(self):
        check_compat(self.compat, "QuantizerConfig.compat")
        if self.rvq.dim != self.block.dim:
            raise ValueError(f"RVQ dim {self.rvq.dim} differs from the transformer width {self.block.dim}")

    @property
    def dim(self) -> int:
        return self.block.dim

    @classmethod
    def from_meta(cls, config: dict, **overrides) -> QuantizerConfig:
        """From a ``query_quantizer`` fixture's ``meta["config"]``."""
        pron = config.get("pron")
        # A decoder-only fixture (the sampler) has no encoder blocks: the released depth stands in.
        return cls(block=BlockConfig.from_meta(config["dim"], config["block_kwargs"]),
                   encoder_depth=config.get("enc_blocks", cls.encoder_depth),
                   decoder_depth=config["dec_blocks"],
                   interval=config.get("interval", 2), rvq=RVQConfig.from_meta(config["rvq"]),
                   pronunciation=(PronunciationConfig.from_meta(pron, config.get("pron_decoder_defaults"))
                                  if pron else PronunciationConfig()),
                   **overrides)


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


def fit_frames(features: Array, config: QuantizerConfig) -> Array:
    """Check ``(B, T, dim)`` features and apply the frame-count rule (module docstring)."""
    if features.ndim != 3 or features.shape[-1] != config.dim:
        raise ValueError(f"quantizer features must be (B, T, {config.dim}), got shape {features.shape}")
    t = features.shape[1]
    if t == 0:
        raise ValueError("quantizer features have no frames")
    extra = -t % config.interval
    if extra and config.compat == "release":
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
    """The quantizer part of ``AudioDiffusion1D``; submodules carry the reference's attribute names."""

    config: QuantizerConfig

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
        enc_in = interleave_queries(fit_frames(features, self.config), self.cls_token(), interval)
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

    def encode_codes(self, features: Array) -> tuple[Array, Array]:
        """Eval: features ``(B, T, dim)`` → codes ``(B, N, Q)`` int32 and quantized ``(B, N, dim)``."""
        vq = self.vq_embed(self.encoder_sequence(features)["query"])
        return vq["codes"], vq["quantized"]

    def dequantize(self, codes: Array) -> Array:
        """Codes ``(B, N, Q)`` → DiT condition ``(B, interval·N, dim)`` at 25 Hz."""
        return self.decoder_sequence(self.lookup(codes))["cond"]


@partial(jax.jit, static_argnames="config")
def encode_codes(variables: dict, features: Array, config: QuantizerConfig) -> tuple[Array, Array]:
    """Tokenize fused features ``(B, T, dim)`` (25 Hz): codes ``(B, N, Q)`` int32 (12.5 Hz) and the
    quantized tokens ``(B, N, dim)``. ``variables`` holds ``params`` and ``codebook``."""
    return QueryQuantizer(config).apply(variables, features, method="encode_codes")


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


def init_variables(config: QuantizerConfig, key: Array, frames: int = 4) -> dict:
    """Fresh ``params`` and ``codebook`` (PyTorch-like init); ``frames`` only sizes the dummy input."""
    return jax.jit(QueryQuantizer(config).init)(key, jnp.zeros((1, frames, config.dim), jnp.float32))


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


def variables_from_state_dict(state_dict: dict[str, np.ndarray], config: QuantizerConfig, source: str = "state dict",
                   parts: tuple[str, ...] = QUANTIZER_PARTS) -> dict:
    """Convert the quantizer keys of a reference (``AudioDiffusion1D``) state dict into ``params`` /
    ``codebook``; keys of other components are ignored. Every variable of ``parts`` must be provided with
    the model's shape, and the RoPE buffers must match the config. ``parts=DECODER_PARTS`` loads only what
    :func:`dequantize` needs."""
    selected = {k: v for k, v in state_dict.items() if k.split(".")[0] in parts}
    check_rope_buffers(selected, config.block)
    expected = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    expected = {col: {name: tree for name, tree in trees.items() if name in parts}
                for col, trees in expected.items()}
    return convert_state_dict(selected, quantizer_rules(config), expected, source=source)
