"""PyTorch-exact primitives in Flax linen, channels-last.

Every layer here takes and returns ``(B, L, C)`` arrays. Parameter layouts are Flax's (``Dense.kernel``
is ``(in, out)``, conv kernels are ``(k, in/groups, out)``); the conversion from PyTorch layouts lives in
:mod:`almtok_jax.mapping`. Weight-normed layers keep ``weight_g``/``weight_v`` as parameters and recompute
the weight in the forward pass (no epsilon, like ``torch.nn.utils.weight_norm``), so trained weights stay
in the reference's parameterisation.

Stacks of identical blocks (Whisper, WavLM, MusicFM, the query transformer, the GPT-loss predictor, the DiT)
share one convention: ``nn.scan`` runs the block class itself (parameters stacked on axis 0); its
``__call__(x, *shared)`` is the scan body and returns ``(x, per_layer)``, ``per_layer`` being the block's
output when the stack reports it and ``None`` otherwise; ``shared`` inputs are broadcast
(``in_axes=nn.broadcast``); there is no dummy ``xs`` argument and no wrapper class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding = int | str | tuple[int, int]

default_kernel_init = nn.initializers.lecun_normal()


def norm_except(v: Array, keep_axis: int) -> Array:
    """L2 norm of ``v`` over every axis except ``keep_axis``, kept as size-1 axes (broadcasts against ``v``)."""
    keep_axis = keep_axis % v.ndim
    axes = tuple(a for a in range(v.ndim) if a != keep_axis)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def weight_norm(v: Array, g: Array, keep_axis: int) -> Array:
    """``g * v / ||v||`` with the norm taken over every axis of ``v`` except ``keep_axis``.

    ``g`` has shape ``(v.shape[keep_axis],)``. No epsilon, as in PyTorch.
    """
    norm = norm_except(v, keep_axis)
    return v * (g.reshape(norm.shape) / norm)


def conv_padding(kernel_size: int, dilation: int, padding: Padding) -> tuple[int, int]:
    """Left/right zero padding of a PyTorch-style conv.

    ``padding`` is an int (symmetric, PyTorch's ``padding=p``), a pair, ``"causal"`` (``d*(k-1)`` on the
    left), ``"same_torch"`` (``(k*d - d)//2`` both sides, the SQ codec's non-causal rule) or ``"valid"``.
    """
    span = dilation * (kernel_size - 1)
    if isinstance(padding, str):
        if padding == "causal":
            return span, 0
        if padding == "same_torch":
            return span // 2, span // 2
        if padding == "valid":
            return 0, 0
        raise ValueError(f"unknown padding mode {padding!r}")
    if isinstance(padding, int):
        return padding, padding
    return tuple(padding)


def _kernel_param(module: nn.Module, shape: tuple[int, ...], keep_axis: int, use_weight_norm: bool,
                  init: Callable) -> Array:
    """The effective kernel: a plain ``kernel`` parameter, or ``weight_g``/``weight_v`` recombined."""
    if not use_weight_norm:
        return module.param("kernel", init, shape)
    v = module.param("weight_v", init, shape)
    g = module.param("weight_g", lambda _: norm_except(v, keep_axis).reshape(-1))
    return weight_norm(v, g, keep_axis)


def _with_bias(module: nn.Module, y: Array) -> Array:
    """``y`` plus the module's ``bias`` parameter ``(features,)`` when it has ``use_bias``."""
    if not module.use_bias:
        return y
    return y + module.param("bias", nn.initializers.zeros, (module.features,)).astype(y.dtype)


class _Conv(nn.Module):
    """Fields shared by :class:`Conv1d` and :class:`ConvTranspose1d`."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    use_bias: bool = True
    use_weight_norm: bool = False
    kernel_init: Callable = default_kernel_init


class Conv1d(_Conv):
    """``torch.nn.Conv1d`` on channels-last input ``(B, L, C_in) -> (B, L_out, features)``.

    Kernel ``(k, C_in/groups, features)``; with ``weight_norm`` the norm is per output channel (torch
    ``dim=0``), or per kernel tap when ``weight_norm_axis=0`` (WavLM's positional conv, torch ``dim=2``).
    """

    groups: int = 1
    padding: Padding = 0
    weight_norm_axis: int = -1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{in_features} input channels not divisible by groups={self.groups}")
        shape = (self.kernel_size, in_features // self.groups, self.features)
        kernel = _kernel_param(self, shape, self.weight_norm_axis, self.use_weight_norm, self.kernel_init)
        left, right = conv_padding(self.kernel_size, self.dilation, self.padding)
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(self.stride,), padding=[(left, right)],
            rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups)
        return _with_bias(self, y)


class ConvTranspose1d(_Conv):
    """``torch.nn.ConvTranspose1d`` on channels-last input ``(B, L, C_in) -> (B, L_out, features)``.

    ``L_out = (L - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1``, then ``trim_right``
    samples are dropped (the SQ codec's causal mode drops ``stride``). Kernel layout ``(k, C_in, features)``
    = torch's ``(in, out, k)`` transposed, not flipped; weight norm is per *input* channel (torch ``dim=0``).
    """

    padding: int = 0
    output_padding: int = 0
    trim_right: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (self.kernel_size, x.shape[-1], self.features)
        kernel = _kernel_param(self, shape, 1, self.use_weight_norm, self.kernel_init)
        span = self.dilation * (self.kernel_size - 1)
        # A transposed conv is a conv over the stride-dilated input with the flipped kernel.
        y = _with_bias(self, jax.lax.conv_general_dilated(
            x, jnp.flip(kernel, 0).astype(x.dtype), window_strides=(1,),
            padding=[(span - self.padding, span - self.padding + self.output_padding)],
            lhs_dilation=(self.stride,), rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC")))
        if self.trim_right:
            y = y[:, : y.shape[1] - self.trim_right]
        return y


class Linear(nn.Module):
    """``torch.nn.Linear``: kernel ``(in, out)``; optional weight norm per output feature."""

    features: int
    use_bias: bool = True
    use_weight_norm: bool = False
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _kernel_param(self, (x.shape[-1], self.features), 1, self.use_weight_norm, self.kernel_init)
        return _with_bias(self, jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype)))


class PReLU(nn.Module):
    """``torch.nn.PReLU(num_parameters)``: slope per channel (or one shared slope), init 0.25."""

    num_parameters: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return prelu(x, self.param("weight", nn.initializers.constant(0.25), (self.num_parameters,)))


def prelu(x: Array, alpha: Array) -> Array:
    """PReLU with an explicit slope ``alpha`` (the :class:`PReLU` module's, or one shared across modules)."""
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def layer_norm(x: Array, eps: float, scale: Array | None = None, bias: Array | None = None,
               axes: Sequence[int] = (-1,)) -> Array:
    """PyTorch LayerNorm: biased variance ``mean((x - mean)^2)`` (two-pass), optional affine."""
    mean = jnp.mean(x, axis=tuple(axes), keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=tuple(axes), keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last axis; ``elementwise_affine=False`` gives no parameters."""

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,)) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (d,)) if self.use_bias else None
        return layer_norm(x, self.eps, scale, bias)


def split_heads(x: Array, num_heads: int) -> Array:
    """``(..., T, H*D) -> (..., T, H, D)``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
    """``(..., T, H, D) -> (..., T, H*D)``: the inverse of :func:`split_heads`."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array | None = None,
                          mask: Array | None = None, scale: float | None = None) -> Array:
    """Multi-head attention core, the reference's explicit form: ``softmax(q k^T * scale + bias) v``.

    q: ``(B, Lq, H, D)``, k/v: ``(B, Lk, H, D)``; bias broadcastable to ``(B, H, Lq, Lk)``; mask (True =
    attend) likewise. Softmax in float32. Returns ``(B, Lq, H, D)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def rotary_inv_freq(dim: int, base: float) -> np.ndarray:
    """Rotary frequencies ``1 / base^(2k/dim)``, ``k < dim/2``, as torch computes them: ``(dim/2,)`` float32.

    torch evaluates ``base ** (arange(0, dim, 2).float() / dim)`` with a float32 result of the exact power
    (one rounding), then the float32 reciprocal. A float32 ``pow`` (numpy's) rounds differently: up to 2 ulp
    off at dims 48-128, which the release's stored buffers (dim 64) show.
    """
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    power = np.power(np.float64(base), exponent).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise distance of two float32 arrays in units in the last place (0 for equal values)."""
    def ordered(x: np.ndarray) -> np.ndarray:
        bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, np.int64(-(2**31)) - bits, bits)  # monotone in the float value
    return np.abs(ordered(a) - ordered(b))


def check_derived_buffer(key: str, stored: np.ndarray, derived: np.ndarray, what: str, max_ulp: int = 8) -> None:
    """Raise if a checkpoint buffer that the model recomputes is not ``derived`` (of the config) up to float32
    rounding: a few ulp is another libm's evaluation of the same formula, more is another architecture.

    The message names the buffer, ``what`` it was compared with, and how far it is.
    """
    stored = np.asarray(stored, np.float32)
    if stored.shape != derived.shape:
        raise ValueError(f"{key} has shape {stored.shape}, {what} has {derived.shape}")
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"{key} holds non-finite values; expected {what}")
    ulp = ulp_distance(stored, derived)
    if ulp.size and ulp.max() > max_ulp:
        i = int(np.argmax(ulp))
        raise ValueError(f"{key} differs from {what}: up to {int(ulp.max())} ulp (max |diff| "
                         f"{float(np.max(np.abs(stored - derived))):.3g}; entry {i}: {stored.flat[i]!r} vs "
                         f"{derived.flat[i]!r}), more than the {max_ulp} ulp of float32 rounding")


def rotary_tables(inv_freq: Array, length: int) -> tuple[Array, Array]:
    """float32 ``cos``/``sin`` of ``t * inv_freq`` for positions ``t = 0..length-1``, each frequency used
    twice (rotate-half pairing): ``(length, 2*len(inv_freq))`` each."""
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE of ``x (B, L, H, D)`` with tables ``(L, R)`` from :func:`rotary_tables`.

    The first ``R <= D`` features of each head become ``x*cos + concat(-x[R/2:R], x[:R/2])*sin`` (in
    float32, cast back to ``x.dtype``); the other ``D - R`` pass through.
    """
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    xr, rest = x[..., :rot].astype(jnp.float32), x[..., rot:]
    rotated_half = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    xr = (xr * cos[None, :, None, :] + rotated_half * sin[None, :, None, :]).astype(x.dtype)
    return jnp.concatenate([xr, rest], axis=-1) if rest.shape[-1] else xr


def gelu_exact(x: Array) -> Array:
    """GELU with the exact erf, PyTorch's default."""
    return jax.nn.gelu(x, approximate=False)
