"""The flow-matching DiT estimator (upstream ``Transformer1DModel``, spec 03 §2), channels-last.

``DiTEstimator(h (B, T, in_channels), t (B,)) -> v (B, T, out_channels)``: one velocity per 25 Hz latent
frame. Input channels are ``[noisy latent | in-context latent | condition]`` (see :mod:`.cfm`).

Structure: ``proj_in`` (conv k3 · k^-½ · linear) → + stored sinusoidal table → ``num_layers`` adaLN-single
blocks (one shared 6-way modulation from the timestep, plus each block's own ``scale_shift_table``) → head
modulated by the raw timestep embedding → ``proj_out``. The blocks run under ``nn.scan`` with their
parameters stacked on a leading layer axis.

Mixed precision: ``DiTConfig.dtype = "bfloat16"`` runs every matmul/conv in bf16 with float32 parameters,
while the residual stream, LayerNorms, softmax and modulation stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.layers import Conv1d, Linear, default_kernel_init, dot_product_attention, layer_norm, merge_heads
from almtok_jax.mapping import Rule, conv1d, linear

Array = jax.Array

# Reference key prefix of the estimator inside the AudioDiffusion1D state dict.
ESTIMATOR_PREFIX = "cfm_wrapper.estimator."
ATTENTION_KERNELS = ("explicit", "xla", "cudnn", "auto")
MAX_POSITION_TABLE_VALUES = 1 << 28  # 1 GiB of float32: 87 000 rows at the release's width (3000 used)


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the estimator; defaults are the released model (spec 03 §1)."""

    num_layers: int = 32
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 1040  # noisy latent + in-context latent + condition
    out_channels: int = 136  # SQ-codec latent channels
    cond_dim: int = 768
    ff_mult: int = 4
    norm_eps: float = 1e-6
    num_positional_embeddings: int = 3000
    timestep_channels: int = 512  # flow_t_size: cos half then sin half
    timestep_scale: float = 1000.0
    timestep_max_period: float = 10000.0
    proj_kernel_size: int = 3
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of matmuls/convs; params stay float32
    remat_policy: str | None = None  # name in jax.checkpoint_policies (e.g. "nothing_saveable") for training
    # Attention kernel: "explicit" (softmax(q kᵀ·s) v written out), or jax.nn.dot_product_attention with
    # implementation "xla" (any backend) / "cudnn" (NVIDIA GPUs, fp16/bf16) / "auto" (JAX picks).
    attention: str = "xla"
    # A few-step student (almtok_jax/flow/shortcut.py): the estimator also takes the step size d (B,), embedded
    # like t and added to the timestep embedding through a zero-initialised linear, so that at
    # initialisation (and at d = 0 when trained so) it is the flow-matching teacher.
    step_embedding: bool = False

    def __post_init__(self) -> None:
        if self.in_channels != 2 * self.out_channels + self.cond_dim:
            raise ValueError(f"DiTConfig: in_channels {self.in_channels} != 2 * out_channels "
                             f"{self.out_channels} + cond_dim {self.cond_dim}")
        if self.timestep_channels % 2:
            raise ValueError(f"DiTConfig: timestep_channels {self.timestep_channels} must be even")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"DiTConfig: dtype {self.dtype!r} is not 'float32' or 'bfloat16'")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"DiTConfig: attention {self.attention!r} is not one of {ATTENTION_KERNELS}")
        if not 1 <= self.num_positional_embeddings * self.inner_dim <= MAX_POSITION_TABLE_VALUES:
            # checked here, before any module is built: the table is computed even for shapes alone
            raise ValueError(f"DiTConfig: num_positional_embeddings {self.num_positional_embeddings} x inner dim "
                             f"{self.inner_dim} is outside 1..{MAX_POSITION_TABLE_VALUES} table values")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """The interleaved sin/cos position table ``(length, dim)``, float32 in the reference's order (§2.2)."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    angle = position * div_term
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return table


def timestep_features(t: Array, channels: int, scale: float, max_period: float) -> Array:
    """Flow timestep features ``(B,) -> (B, channels)``: ``[cos(a), sin(a)]`` with ``a = (t·f)·scale``.

    ``f_j = exp(-ln(max_period)·j/half)``; everything in float32 as upstream (arguments reach ~1000 rad).
    """
    half = channels // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = (t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]) * scale
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ProjectLayer(nn.Module):
    """Conv1d (kernel k, "same" zero padding) · k^-½ → Linear, no activation in between (§2.1)."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Conv1d(self.features, self.kernel_size, padding=self.kernel_size // 2, name="ffn_1")(
            x.astype(self.dtype))
        x = x * jnp.asarray(self.kernel_size ** -0.5, x.dtype)
        return Linear(self.features, name="ffn_2")(x)


class AdaLayerNormSingle(nn.Module):
    """Timestep ``t (B,)`` → (``e (B, D)`` for the head, ``m (B, 6·D)`` shared by every block) (§2.3);
    with ``step_embedding`` the step size ``step (B,)`` is added after ``linear_1`` (zero at init)."""

    config: DiTConfig

    @nn.compact
    def __call__(self, t: Array, step: Array | None = None) -> tuple[Array, Array]:
        cfg = self.config
        d = cfg.inner_dim
        feats = timestep_features(t, cfg.timestep_channels, cfg.timestep_scale, cfg.timestep_max_period)
        h = Linear(d, name="linear_1")(feats)
        if cfg.step_embedding:
            step_feats = timestep_features(step, cfg.timestep_channels, cfg.timestep_scale, cfg.timestep_max_period)
            h = h + Linear(d, kernel_init=nn.initializers.zeros, name="step_embedder")(step_feats)
        e = Linear(d, name="linear_2")(nn.silu(h))
        m = Linear(6 * d, name="linear")(nn.silu(e))
        return e, m


def _linear_init(key: Array, shape: tuple[int, int]) -> dict[str, Array]:
    """A :class:`Linear`'s variables ``{"kernel" (in, out), "bias" (out,)}`` (same layout and init)."""
    return {"kernel": default_kernel_init(key, shape), "bias": jnp.zeros(shape[-1:], jnp.float32)}


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections, no mask or RoPE.

    The parameters stay the reference's separate ``to_q``/``to_k``/``to_v`` (a pure transpose of its keys);
    they are concatenated at apply time into one ``(D, 3D)`` projection, one GEMM instead of three.
    """

    num_heads: int
    head_dim: int
    kernel: str = "xla"  # see DiTConfig.attention

    @nn.compact
    def __call__(self, a: Array) -> Array:
        b, t, width = a.shape
        d = self.num_heads * self.head_dim
        kernels = [self.param(f"to_{n}", _linear_init, (width, d)) for n in "qkv"]
        w = jnp.concatenate([p["kernel"] for p in kernels], axis=1).astype(a.dtype)
        bias = jnp.concatenate([p["bias"] for p in kernels]).astype(a.dtype)
        qkv = (jnp.einsum("...i,io->...o", a, w) + bias).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.kernel == "explicit":
            out = dot_product_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=None if self.kernel == "auto" else self.kernel)
        return Linear(d, name="to_out")(merge_heads(out))


class FeedForward(nn.Module):
    """Linear D→mult·D, GELU (tanh approximation), Linear back to D."""

    dim: int
    mult: int

    @nn.compact
    def __call__(self, f: Array) -> Array:
        f = Linear(self.mult * self.dim, name="net_0")(f)
        return Linear(self.dim, name="net_2")(jax.nn.gelu(f, approximate=True))


class PositionTable(nn.Module):
    """The additive sinusoidal table, non-trainable ``buffers/.../pe (rows, dim)``; returns ``pe[:T]``."""

    rows: int
    dim: int

    @nn.compact
    def __call__(self, frames: int) -> Array:
        if frames > self.rows:
            raise ValueError(f"DiT input has {frames} frames but the position table has only {self.rows} "
                             f"(num_positional_embeddings); split the input into shorter windows")
        pe = self.variable("buffers", "pe", lambda: jnp.asarray(sinusoidal_table(self.rows, self.dim)))
        return pe.value[:frames]


class DiTBlock(nn.Module):
    """adaLN-single transformer block: modulated self-attention then modulated GELU(tanh) FF (§2.4).

    Called as a scan body: ``(x (B, T, D), m (B, 6·D)) -> (x, None)``; sows ``hidden`` (its output).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: Array, m: Array) -> tuple[Array, None]:
        cfg = self.config
        d, heads, cdt = cfg.inner_dim, cfg.num_attention_heads, cfg.compute_dtype
        table = self.param("scale_shift_table", nn.initializers.normal(d ** -0.5), (6, d))
        mod = table[None] + m.reshape(m.shape[0], 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, j, None, :] for j in range(6))

        a = layer_norm(x, cfg.norm_eps) * (1 + scale_msa) + shift_msa
        attn = SelfAttention(heads, cfg.attention_head_dim, cfg.attention, name="attn1")(a.astype(cdt))
        x = gate_msa * attn.astype(jnp.float32) + x

        f = layer_norm(x, cfg.norm_eps) * (1 + scale_mlp) + shift_mlp
        f = FeedForward(d, cfg.ff_mult, name="ff")(f.astype(cdt))
        x = gate_mlp * f.astype(jnp.float32) + x
        self.sow("intermediates", "hidden", x)
        return x, None


class DiTEstimator(nn.Module):
    """``h (B, T, in_channels)``, ``t (B,)`` in [0, 1] → velocity ``(B, T, out_channels)`` float32; with
    ``step_embedding`` also ``step (B,)``, the step size the velocity is averaged over (default 0).

    Variables: ``params`` (blocks stacked under ``transformer_blocks``) and the non-trainable
    ``buffers/pos_embed/pe (num_positional_embeddings, D)``. Apply with ``mutable=["intermediates"]`` to
    also get ``h_proj_in``, ``h_pos_embed`` (after proj_in, after + pe), ``adaln_e``, ``adaln_m`` and the
    per-block ``hidden`` (stacked, see :func:`block_outputs`).
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, h: Array, t: Array, step: Array | None = None) -> Array:
        cfg = self.config
        b, frames, channels = h.shape
        if channels != cfg.in_channels:
            raise ValueError(f"DiT input has {channels} channels, expected in_channels {cfg.in_channels}")
        if t.shape != (b,):
            raise ValueError(f"DiT timestep must have shape ({b},) (one per batch row), got {t.shape}")
        if step is not None and not cfg.step_embedding:
            raise ValueError("DiT got a step size but has no step embedding (dit.step_embedding: false)")
        if cfg.step_embedding:
            step = jnp.zeros_like(t) if step is None else step
        d, cdt = cfg.inner_dim, cfg.compute_dtype
        pe = PositionTable(cfg.num_positional_embeddings, d, name="pos_embed")(frames)

        x = ProjectLayer(d, cfg.proj_kernel_size, cdt, name="proj_in")(h).astype(jnp.float32)
        self.sow("intermediates", "h_proj_in", x)
        x = x + pe[None]
        self.sow("intermediates", "h_pos_embed", x)

        e, m = AdaLayerNormSingle(cfg, name="adaln_single")(t, step)
        self.sow("intermediates", "adaln_e", e)
        self.sow("intermediates", "adaln_m", m)

        block = DiTBlock
        if cfg.remat_policy is not None:
            policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
            block = nn.remat(block, prevent_cse=False, policy=policy)
        blocks = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=cfg.num_layers)
        x, _ = blocks(cfg, name="transformer_blocks")(x, m)

        table = self.param("scale_shift_table", nn.initializers.normal(d ** -0.5), (2, d))
        head = table[None] + e[:, None]
        shift, scale = head[:, 0:1], head[:, 1:2]
        y = layer_norm(x, cfg.norm_eps) * (1 + scale) + shift
        out = ProjectLayer(cfg.out_channels, cfg.proj_kernel_size, cdt, name="proj_out")(y)
        return out.astype(jnp.float32)


def example_inputs(config: DiTConfig, frames: int = 4) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shape-only ``(h (1, frames, in_channels), t (1,))`` for the estimator's ``init``."""
    return (jax.ShapeDtypeStruct((1, frames, config.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32))


def init_shapes(config: DiTConfig, frames: int = 4) -> dict:
    """``jax.eval_shape`` of the bare estimator's variables (the ``expected=`` of its weight conversion)."""
    return jax.eval_shape(DiTEstimator(config).init, jax.random.key(0), *example_inputs(config, frames))


def _drop_batch(a: np.ndarray) -> np.ndarray:
    """``pos_embed.pe (1, L, D) -> (L, D)``."""
    return a[0]


def dit_rules(config: DiTConfig) -> list[Rule]:
    """Rules for the ``cfm_wrapper.estimator.*`` keys (given relative to that prefix), blocks stacked.

    The estimator's state dict has no dead keys (no LayerNorm affine, attn2 or norm3); the resolution /
    aspect-ratio embedders upstream never builds would be rejected as unexpected.
    """
    del config  # the key set does not depend on sizes; shapes are checked against eval_shape
    blk = r"transformer_blocks\.(?P<i>\d+)\."
    tb = "params/transformer_blocks"
    return [
        Rule(r"scale_shift_table", "params/scale_shift_table"),
        Rule(r"proj_(?P<p>in|out)\.ffn_1\.weight", "params/proj_{p}/ffn_1/kernel", conv1d),
        Rule(r"proj_(?P<p>in|out)\.(?P<l>ffn_1|ffn_2)\.bias", "params/proj_{p}/{l}/bias"),
        Rule(r"proj_(?P<p>in|out)\.ffn_2\.weight", "params/proj_{p}/ffn_2/kernel", linear),
        Rule(r"pos_embed\.pe", "buffers/pos_embed/pe", _drop_batch),
        Rule(r"adaln_single\.emb\.timestep_embedder\.(?P<l>linear_[12])\.weight",
             "params/adaln_single/{l}/kernel", linear),
        Rule(r"adaln_single\.emb\.timestep_embedder\.(?P<l>linear_[12])\.bias",
             "params/adaln_single/{l}/bias"),
        Rule(r"adaln_single\.linear\.weight", "params/adaln_single/linear/kernel", linear),
        Rule(r"adaln_single\.linear\.bias", "params/adaln_single/linear/bias"),
        Rule(blk + r"scale_shift_table", f"{tb}/scale_shift_table", stack="i"),
        Rule(blk + r"attn1\.(?P<n>to_q|to_k|to_v)\.weight", tb + "/attn1/{n}/kernel", linear, stack="i"),
        Rule(blk + r"attn1\.(?P<n>to_q|to_k|to_v)\.bias", tb + "/attn1/{n}/bias", stack="i"),
        Rule(blk + r"attn1\.to_out\.0\.weight", f"{tb}/attn1/to_out/kernel", linear, stack="i"),
        Rule(blk + r"attn1\.to_out\.0\.bias", f"{tb}/attn1/to_out/bias", stack="i"),
        Rule(blk + r"ff\.net\.0\.proj\.weight", f"{tb}/ff/net_0/kernel", linear, stack="i"),
        Rule(blk + r"ff\.net\.0\.proj\.bias", f"{tb}/ff/net_0/bias", stack="i"),
        Rule(blk + r"ff\.net\.2\.weight", f"{tb}/ff/net_2/kernel", linear, stack="i"),
        Rule(blk + r"ff\.net\.2\.bias", f"{tb}/ff/net_2/bias", stack="i"),
    ]


def block_outputs(intermediates: dict) -> Array:
    """The stacked per-block outputs ``(num_layers, B, T, D)`` from an ``intermediates`` collection."""
    (hidden,) = intermediates["transformer_blocks"]["hidden"]
    return hidden


__all__ = ["DiTConfig", "DiTEstimator", "ESTIMATOR_PREFIX", "dit_rules", "init_shapes", "block_outputs",
           "sinusoidal_table", "timestep_features", "ProjectLayer", "DiTBlock", "AdaLayerNormSingle",
           "SelfAttention", "FeedForward", "PositionTable"]
