"""Residual vector quantizer (``vq_embed``: ``vector_quantize_pytorch.ResidualVQ`` 1.21.0, spec 02 §4).

``project_in`` (dim → codebook_dim) and ``project_out`` are shared by all ``Q`` layers. Layer ``i`` quantizes
the running residual to its nearest code (Euclidean, ties to the lowest index) and passes on
``r - stop_gradient(output)``; the output is the ``project_out`` of the sum of the layer outputs. Rates
are untouched: tokens ``(B, N, dim)`` in, codes ``(B, N, Q)`` out.

The codebooks are not optimizer parameters. ``embed``, ``embed_avg`` (EMA of the assigned sums) and
``cluster_size`` (EMA of the counts) live in the ``codebook`` collection, stacked over layers
``(Q, K, C)`` / ``(Q, K)``. The training forward (``train=True``) is functional: it returns the updated
state through the ``codebook`` collection (``apply(..., mutable=["codebook"])``): EMA update with the
codebook's decay, Laplace smoothing, then dead-code replacement from the layer's inputs (random rows drawn
with an explicit key). The training output carries the rotation-trick gradient (or a plain
straight-through estimator, ``gradient="straight_through"``), and the per-layer commitment losses
``mean((sg(q_i) - r_i)^2)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax import mapping
from almtok_jax.layers import Linear
from almtok_jax.mapping import Rule

Array = jax.Array
CodebookState = tuple[Array, Array, Array]  # embed (K, C), embed_avg (K, C), cluster_size (K,)


@dataclass(frozen=True)
class RVQConfig:
    """``ResidualVQ(dim, codebook_size, decay, commitment_weight, threshold_ema_dead_code, codebook_dim,
    num_quantizers)``; released: 768 → 8 codebooks × 8192 codes of dim 32."""

    dim: int = 768
    codebook_size: int = 8192
    codebook_dim: int = 32
    num_quantizers: int = 8
    decay: float = 0.9
    eps: float = 1e-5
    commitment_weight: float = 1.0
    threshold_ema_dead_code: float = 2.0
    gradient: Literal["rotation_trick", "straight_through"] = "rotation_trick"  # straight-through: library < 1.18

    def __post_init__(self):
        if self.gradient not in ("rotation_trick", "straight_through"):
            raise ValueError(f"RVQConfig.gradient must be 'rotation_trick' or 'straight_through', "
                             f"got {self.gradient!r}")


def code_distances(r: Array, embed: Array) -> Array:
    """Euclidean distances ``(M, K)`` of rows ``r (M, C)`` to codes ``embed (K, C)``, in the library's
    expanded form ``sqrt(max(|r|^2 + |e|^2 - 2 r.e, 0))`` (float32)."""
    r2 = jnp.sum(jnp.square(r), axis=-1)[:, None]
    e2 = jnp.sum(jnp.square(embed), axis=-1)[None, :]
    return jnp.sqrt(jnp.maximum(r2 + e2 + (r @ embed.T) * -2.0, 0.0))


def nearest_code(r: Array, embed: Array) -> Array:
    """Index ``(M,)`` int32 of the nearest code; ties go to the lowest index."""
    return jnp.argmin(code_distances(r, embed), axis=-1).astype(jnp.int32)


def _row_sum(a: Array) -> Array:
    """Sum over the last (codebook) axis, left to right, keeping the axis: the accumulation order of the
    reference's small per-row norms and dot products. With fused multiply-adds off (the reference's
    kernels use none; XLA's CPU backend fuses by default) the rotation-trick values and gradients match
    the reference bit for bit (``tests/rvq_reference_order.py``)."""
    return functools.reduce(jnp.add, [a[..., i:i + 1] for i in range(a.shape[-1])])


def _divide(a: Array, b: Array) -> Array:
    """``a / b`` with ``b`` broadcast to ``a``'s shape, kept a true division: XLA otherwise rewrites a
    division by a broadcast into a multiplication by the reciprocal, one rounding away from the reference."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _safe_div(a: Array, b: Array) -> Array:
    return _divide(a, jnp.maximum(b, 1e-6))


@jax.custom_vjp
def rotation_trick(r: Array, q: Array) -> Array:
    """``λ (r - 2(r.w)w + 2(r.u)q̂)`` per row of ``r, q (M, C)``: equal to ``q`` up to rounding.

    ``u = r/|r|``, ``q̂ = q/|q|``, ``w = (u + q̂)/|u + q̂|``, ``λ = |q|/|r|`` (norms clamped at 1e-6) are
    constants, so the backward map is ``g -> λ (g - 2w(w.g) + 2u(q̂.g))`` into ``r`` and nothing into ``q``.
    """
    return _rotation_fwd(r, q)[0]


def _rotation_fwd(r: Array, q: Array) -> tuple[Array, tuple]:
    r_norm = jnp.sqrt(_row_sum(r * r))
    q_norm = jnp.sqrt(_row_sum(q * q))
    u, q_hat = _safe_div(r, r_norm), _safe_div(q, q_norm)
    w = _safe_div(u + q_hat, jnp.sqrt(_row_sum(jnp.square(u + q_hat))))
    scale = _safe_div(q_norm, r_norm)
    rotated = (r - 2.0 * (_row_sum(r * w) * w)) + 2.0 * (_row_sum(r * u) * q_hat)
    return rotated * scale, (u, q_hat, w, scale)


def _rotation_bwd(res: tuple, g: Array) -> tuple[Array, Array]:
    u, q_hat, w, scale = res
    g = g * scale
    grad_r = (_row_sum(2.0 * g * q_hat) * u + g) + _row_sum(-2.0 * g * w) * w
    return grad_r, jnp.zeros_like(u)


rotation_trick.defvjp(_rotation_fwd, _rotation_bwd)


def straight_through(r: Array, q: Array) -> Array:
    """Value ``q``, identity gradient into ``r``."""
    return r + jax.lax.stop_gradient(q - r)


def ema_update(state: CodebookState, x: Array, idx: Array, config: RVQConfig) -> CodebookState:
    """EMA of counts and sums of the rows ``x (M, C)`` assigned to ``idx (M,)``, then
    ``embed = embed_avg / laplace-smoothed counts`` (library order of operations)."""
    embed, embed_avg, cluster_size = state
    onehot = jax.nn.one_hot(idx, config.codebook_size, dtype=x.dtype)
    weight = np.float32(1.0 - config.decay)  # torch.lerp_(new, 1 - decay) with a float32 weight
    cluster_size = cluster_size + weight * (jnp.sum(onehot, axis=0) - cluster_size)
    embed_avg = embed_avg + weight * (onehot.T @ x - embed_avg)
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + config.eps) / (total + config.codebook_size * config.eps) * total
    return _divide(embed_avg, smoothed[:, None]), embed_avg, cluster_size


def replace_dead_codes(state: CodebookState, x: Array, key: Array, config: RVQConfig) -> CodebookState:
    """Codes with ``cluster_size < threshold`` get random rows of ``x (M, C)`` (the layer's inputs).

    As the library: distinct rows (a permutation prefix) when there are at least as many rows as dead
    codes, rows drawn with replacement otherwise; dead codes in ascending order take the draws in order.
    A replaced code gets ``cluster_size = threshold`` and ``embed_avg = threshold * row``.
    """
    embed, embed_avg, cluster_size = state
    threshold = config.threshold_ema_dead_code
    dead = cluster_size < threshold
    n_rows = x.shape[0]
    rank = jnp.cumsum(dead) - 1  # order of each dead code among the dead ones
    perm_key, draw_key = jax.random.split(key)
    distinct = jax.random.permutation(perm_key, n_rows)[jnp.clip(rank, 0, n_rows - 1)]
    with_replacement = jax.random.randint(draw_key, (config.codebook_size,), 0, n_rows)[jnp.maximum(rank, 0)]
    rows = x[jnp.where(jnp.sum(dead) <= n_rows, distinct, with_replacement)]
    return (jnp.where(dead[:, None], rows, embed),
            jnp.where(dead[:, None], rows * threshold, embed_avg),
            jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype), cluster_size))


def residual_quantize_eval(r0: Array, embeds: Array) -> tuple[Array, Array, Array]:
    """Eval-mode residual quantization of ``r0 (M, C)`` with codebooks ``embeds (Q, K, C)``.

    Returns codes ``(Q, M)`` int32, code vectors ``(Q, M, C)`` and each layer's input residual ``(Q, M, C)``.
    """
    def layer(r, embed):
        idx = nearest_code(r, embed)
        q = embed[idx]
        return r - q, (idx, q, r)

    return jax.lax.scan(layer, r0, embeds)[1]


def residual_quantize_train(r0: Array, state: CodebookState, key: Array | None, config: RVQConfig
                            ) -> tuple[dict[str, Array], CodebookState]:
    """Training-mode residual quantization of ``r0 (M, C)``; ``state`` stacked over layers.

    Per layer: assign with the codebook before this step's update, EMA update, dead-code replacement
    (needs ``key`` when ``threshold_ema_dead_code > 0``), commitment loss, gradient estimator, residual
    ``r - sg(output)``. Returns per-layer ``codes (Q, M)``, ``outputs (Q, M, C)``, ``residual_in
    (Q, M, C)``, ``losses (Q,)`` and the new state.
    """
    estimator = rotation_trick if config.gradient == "rotation_trick" else straight_through
    expire = config.threshold_ema_dead_code > 0
    if expire and key is None:
        raise ValueError("the RVQ training forward needs a PRNG key for dead-code replacement "
                         "(threshold_ema_dead_code > 0)")
    keys = jax.random.split(key, config.num_quantizers) if expire else jnp.zeros((config.num_quantizers,))

    def layer(r, per_layer):
        layer_state, layer_key = per_layer[:3], per_layer[3]
        x = jax.lax.stop_gradient(r)
        idx = nearest_code(x, layer_state[0])
        q = jax.lax.stop_gradient(layer_state[0][idx])
        new_state = ema_update(layer_state, x, idx, config)
        if expire:
            new_state = replace_dead_codes(new_state, x, layer_key, config)
        loss = config.commitment_weight * jnp.mean(jnp.square(q - r))
        out = estimator(r, q)
        return r - jax.lax.stop_gradient(out), ((idx, out, r, loss), new_state)

    (idx, out, r_in, losses), new_state = jax.lax.scan(layer, r0, (*state, keys))[1]
    return {"codes": idx, "outputs": out, "residual_in": r_in, "losses": losses}, new_state


def _kaiming_uniform_codebook(key: Array, shape: tuple[int, ...]) -> Array:
    """torch ``kaiming_uniform_`` on the library's ``(1, K, C)`` tensor, per layer: U(±sqrt(6/(K*C)))."""
    bound = float(np.sqrt(6.0 / (shape[-2] * shape[-1])))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class ResidualVQ(nn.Module):
    """Tokens ``(B, N, dim)`` → dict with ``quantized (B, N, dim)``, ``codes (B, N, Q)`` int32,
    ``losses (Q,)`` (zeros in eval), ``residual_in`` / ``outputs`` ``(Q, B, N, C)`` per layer."""

    config: RVQConfig

    def setup(self):
        c = self.config
        self.project_in = Linear(c.codebook_dim)
        self.project_out = Linear(c.dim)
        q, k, d = c.num_quantizers, c.codebook_size, c.codebook_dim
        self.embed = self.variable("codebook", "embed",
                                   lambda: _kaiming_uniform_codebook(self.make_rng("params"), (q, k, d)))
        self.embed_avg = self.variable("codebook", "embed_avg", lambda: self.embed.value)
        self.cluster_size = self.variable("codebook", "cluster_size", lambda: jnp.ones((q, k), jnp.float32))

    def __call__(self, x: Array, train: bool = False, key: Array | None = None) -> dict[str, Array]:
        c = self.config
        if x.shape[-1] != c.dim:
            raise ValueError(f"ResidualVQ expects tokens of width {c.dim}, got shape {x.shape}")
        lead = x.shape[:-1]
        r0 = self.project_in(x.astype(jnp.float32)).reshape(-1, c.codebook_dim)
        if train:
            state = (self.embed.value, self.embed_avg.value, self.cluster_size.value)
            layers, new_state = residual_quantize_train(r0, state, key, c)
            if not self.is_initializing():
                self.embed.value, self.embed_avg.value, self.cluster_size.value = new_state
            losses = layers["losses"]
        else:
            codes, outputs, residual_in = residual_quantize_eval(r0, self.embed.value)
            layers = {"codes": codes, "outputs": outputs, "residual_in": residual_in}
            losses = jnp.zeros((c.num_quantizers,), jnp.float32)
        quantized = self.project_out(jnp.sum(layers["outputs"], axis=0))
        return {
            "quantized": quantized.reshape(*lead, c.dim),
            "codes": jnp.moveaxis(layers["codes"], 0, -1).reshape(*lead, c.num_quantizers),
            "losses": losses,
            "residual_in": layers["residual_in"].reshape(c.num_quantizers, *lead, c.codebook_dim),
            "outputs": layers["outputs"].reshape(c.num_quantizers, *lead, c.codebook_dim),
        }

    def code_vectors(self, codes: Array) -> Array:
        """``codes (..., Q)`` → per-layer code vectors ``(Q, ..., C)``; code -1 gives a zero vector."""
        c = self.config
        if codes.shape[-1] != c.num_quantizers:
            raise ValueError(f"codes must have {c.num_quantizers} codebook columns (last axis), "
                             f"got shape {codes.shape}")
        codes = jnp.moveaxis(codes.astype(jnp.int32), -1, 0)
        vectors = jax.vmap(lambda e, i: e[jnp.maximum(i, 0)])(self.embed.value, codes)
        return jnp.where((codes >= 0)[..., None], vectors, 0.0)

    def lookup(self, codes: Array) -> Array:
        """``get_output_from_indices``: ``codes (..., Q)`` → ``project_out(Σ_i E_i[codes_i]) (..., dim)``,
        identical to the eval ``quantized``."""
        return self.project_out(jnp.sum(self.code_vectors(codes), axis=0))


def rvq_rules() -> list[Rule]:
    """``vq_embed.*`` keys relative to the prefix: projections → ``params``, codebook buffers squeezed and
    stacked over layers → ``codebook``; ``initted`` (float ``(1,)`` or bool scalar) is dropped."""
    layer = r"layers\.(?P<i>\d+)\._codebook\."
    return [
        Rule(r"project_in\.weight", "params/project_in/kernel", mapping.linear),
        Rule(r"project_in\.bias", "params/project_in/bias"),
        Rule(r"project_out\.weight", "params/project_out/kernel", mapping.linear),
        Rule(r"project_out\.bias", "params/project_out/bias"),
        Rule(layer + "initted", None),
        Rule(layer + "embed", "codebook/embed", _squeeze_head, stack="i"),
        Rule(layer + "embed_avg", "codebook/embed_avg", _squeeze_head, stack="i"),
        Rule(layer + "cluster_size", "codebook/cluster_size", _squeeze_head, stack="i"),
    ]


def _squeeze_head(a: np.ndarray) -> np.ndarray:
    """Drop the library's leading codebook-head axis (``heads=1``)."""
    if a.shape[0] != 1:
        raise ValueError(f"multi-head codebooks are not supported (buffer of shape {a.shape})")
    return a[0]
