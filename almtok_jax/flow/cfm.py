"""Conditional flow matching around the DiT: the training loss and the jit-compiled CFG sampler.

Conventions (spec 03 §4–5): ``t = 0`` is noise and ``t = 1`` is data; the path is
``y = (1 − (1 − σ)·t)·z + t·x1`` with target velocity ``u = x1 − (1 − σ)·z``. Latents are channels-last
``(B, T, C)`` at 25 Hz; the condition is ``(B, T, cond_dim)`` on the same frames. Frame masks use the
reference's codes: 2 = target, 1 = in-context prompt, 0 = padding. The estimator input is
``[noisy latent | in-context latent | condition]`` on channels.

The estimator is passed as a function ``velocity(h (B', T, in_channels), t (B',)) -> (B', T, C)`` so that
loss and sampler work with any parameters (e.g. ``lambda h, t: model.apply(variables, h, t)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.component import DIT_CONFIG, Component, DeriveError, KeyShapes, ReleaseFiles, layer_indices, shape_of
from almtok_jax.flow.dit import ESTIMATOR_PREFIX, DiTConfig, DiTEstimator, dit_rules, example_inputs
from almtok_jax.mapping import Rule, prefixed

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]

TARGET, PROMPT, PADDING = 2, 1, 0


# ----------------------------------------------------------------------------------------------- masks


def prompt_mask(frames: int, prompt_len: Array) -> Array:
    """``(B,)`` prompt lengths → ``(B, T)`` bool, True on frames ``[0, prompt_len)``."""
    return jnp.arange(frames)[None] < jnp.asarray(prompt_len)[:, None]


def inference_masks(frames: int, latent_length: Array, prompt_len: Array) -> Array:
    """Masks of one inference window ``(B, T)`` int32: 2 on ``[0, latent_length)``, then 1 on the prompt."""
    valid = jnp.arange(frames)[None] < jnp.asarray(latent_length)[:, None]
    masks = jnp.where(valid, TARGET, PADDING)
    return jnp.where(prompt_mask(frames, prompt_len), PROMPT, masks).astype(jnp.int32)


def fill_padding(cond: Array, masks: Array, zero_cond: Array) -> Array:
    """Replace the condition on padding frames (mask 0) by the learned ``zero_cond_embedding1``."""
    return jnp.where((masks < 0.5)[..., None], zero_cond.astype(cond.dtype), cond)


def incontext_latents(latents: Array, masks: Array) -> Array:
    """``latents · [mask == 1]``: the clean latent on prompt frames, zero elsewhere."""
    return latents * (masks == PROMPT)[..., None].astype(latents.dtype)


def estimator_input(x: Array, prompt: Array, cond: Array) -> Array:
    """``[noisy latent | in-context latent | condition]`` on the channel axis."""
    return jnp.concatenate([x, prompt, cond], axis=-1)


# ------------------------------------------------------------------------------------------------ loss

SIGMA_MIN = 1e-4  # σ, the flow path's noise floor: one value for training and sampling (spec 03, notation)


@dataclass(frozen=True)
class FlowLossConfig:
    """Training-time masking and loss settings (spec 03 §4)."""

    sigma_min: float = SIGMA_MIN
    cfg_dropout: float = 0.1  # per sample, the whole condition becomes 0
    prefix_probability: float = 0.5  # per batch ('other_seg'): every sample gets an in-context prefix
    prefix_min: int = 32  # prefix length drawn uniformly from [prefix_min, prefix_max], both included
    prefix_max: int = 64
    padding_weight: float = 0.01  # loss weight of mask-0 frames; prompt frames weigh 0, targets 1
    validation_t: float = 0.5  # flow time used in validation mode


@dataclass(frozen=True)
class FlowLossDraws:
    """Every random draw of one loss evaluation, in the reference's order (inject these for parity).

    ``use_prefix ()`` bool; ``prefix_len (B,)`` int; ``cfg_uniform (B,)`` in [0, 1); ``t (B,)``;
    ``z (B, T, C)`` standard normal.
    """

    use_prefix: Array
    prefix_len: Array
    cfg_uniform: Array
    t: Array
    z: Array


jax.tree_util.register_dataclass(
    FlowLossDraws, data_fields=["use_prefix", "prefix_len", "cfg_uniform", "t", "z"], meta_fields=[])


def sample_loss_draws(key: Array, shape: tuple[int, int, int], config: FlowLossConfig,
                      validation: bool = False) -> FlowLossDraws:
    """Draw :class:`FlowLossDraws` for latents of ``shape = (B, T, C)``; validation fixes ``t``."""
    b = shape[0]
    k_scn, k_len, k_cfg, k_t, k_z = jax.random.split(key, 5)
    t = (jnp.full((b,), config.validation_t, jnp.float32) if validation
         else jax.random.uniform(k_t, (b,), jnp.float32))
    return FlowLossDraws(
        use_prefix=jax.random.bernoulli(k_scn, config.prefix_probability),
        prefix_len=jax.random.randint(k_len, (b,), config.prefix_min, config.prefix_max + 1),
        cfg_uniform=jax.random.uniform(k_cfg, (b,), jnp.float32),
        t=t, z=jax.random.normal(k_z, shape, jnp.float32))


def loss_weights(masks: Array, padding_weight: float) -> Array:
    """Per-frame weights ``(B, T)``: 1 on targets (mask 2), ``padding_weight`` on padding, 0 on prompts."""
    return jnp.where(masks > 1.5, 1.0, jnp.where(masks < 0.5, padding_weight, 0.0)).astype(jnp.float32)


def flow_matching_loss(velocity: VelocityFn, latents: Array, cond: Array, latent_masks: Array,
                       zero_cond: Array, draws: FlowLossDraws, config: FlowLossConfig, groups: int = 1
                       ) -> tuple[Array, dict[str, Array]]:
    """The training loss of one batch and its intermediates.

    ``latents (B, T, C)`` clean targets x1, ``cond (B, T, cond_dim)``, ``latent_masks (B, T)`` with 2 on
    valid and 0 on padding frames, ``zero_cond (cond_dim,)``. Returns ``(loss, aux)``; ``aux`` holds
    ``latent_masks`` (with the prefix marked), ``cond`` (padding-filled, CFG-dropped), ``incontext``,
    ``y``, ``t``, ``velocity``. The loss is ``Σ (w·v̂ − w·u)² / (Σ w · C)`` (so the numerator carries w²)
    over the whole batch; with ``groups`` > 1 it is that ratio per group of ``B / groups`` consecutive rows,
    averaged over the groups (the reference's per-GPU loss averaged by DDP, one group per device).
    """
    b, frames, channels = latents.shape
    if cond.shape[:2] != (b, frames) or latent_masks.shape != (b, frames):
        raise ValueError(f"condition {cond.shape} and masks {latent_masks.shape} must cover the latents' "
                         f"(B, T) = {(b, frames)}")
    prefix = prompt_mask(frames, draws.prefix_len) & draws.use_prefix
    masks = jnp.where(prefix, PROMPT, latent_masks)
    cond = fill_padding(cond, masks, zero_cond)
    cond = jnp.where((draws.cfg_uniform < config.cfg_dropout)[:, None, None], 0.0, cond)
    prompt = incontext_latents(latents, masks)

    t = draws.t.astype(jnp.float32)
    tb = t[:, None, None]
    y = (1 - (1 - config.sigma_min) * tb) * draws.z + tb * latents
    u = latents - (1 - config.sigma_min) * draws.z
    v = velocity(estimator_input(y, prompt, cond), t)

    w = loss_weights(masks, config.padding_weight)[..., None]
    if groups == 1:
        loss = jnp.sum(jnp.square(w * v - w * u)) / (jnp.sum(w) * channels)
    else:
        if b % groups:
            raise ValueError(f"a batch of {b} rows does not split into {groups} equal loss groups")
        num = jnp.sum(jnp.square(w * v - w * u), axis=(1, 2)).reshape(groups, -1).sum(axis=1)
        loss = jnp.mean(num / (jnp.sum(w, axis=(1, 2)).reshape(groups, -1).sum(axis=1) * channels))
    aux = dict(latent_masks=masks, cond=cond, incontext=prompt, y=y, t=t, velocity=v)
    return loss, aux


# --------------------------------------------------------------------------------------------- sampler


# Explicit Runge-Kutta solvers as Butcher tableaux ``(c, A, b)``: stage i is evaluated at ``t + c_i·dt`` on
# ``x + dt·Σ_j A_ij k_j``, and the step is ``x + dt·Σ_i b_i k_i``.
RUNGE_KUTTA: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "euler": ((0.0,), ((),), (1.0,)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    # Euler steps of a few-step student that is told the step size (dit.step_embedding, flow/shortcut.py)
    "shortcut": ((0.0,), ((),), (1.0,)),
}
# Adams-Bashforth: one estimator call per step, the previous velocity reused (variable-step coefficients, so
# any time grid works), Euler for the first step. (A third order would need a second-order start to keep
# its order: with an Euler start it converges at order 2.)
ADAMS_BASHFORTH = {"ab2": 2}
Solver = Literal["euler", "midpoint", "heun", "rk4", "ab2", "shortcut"]
SOLVERS = tuple(s for s in get_args(Solver) if s != "shortcut")  # the ODE solvers of any velocity field
SOLVER_ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 2, "shortcut": 1}
TimeGrid = Literal["uniform", "power", "cosine"]
TIME_GRIDS = get_args(TimeGrid)


@dataclass(frozen=True)
class SamplerConfig:
    """ODE sampler settings (spec 03 §5.3). :data:`RELEASE_SAMPLER` is what the released ``infer.py`` runs.

    ``solver`` is one of :data:`SOLVERS` or ``shortcut``; ``time_grid`` places the ``num_steps + 1`` times in [0, 1]:
    ``uniform`` (the reference's float32 linspace), ``power`` (``t = s^grid_power``) or ``cosine``
    (``t = 1 − cos(π s / 2)``), the last two with shorter steps near t = 0. ``num_steps`` counts solver
    steps; :attr:`evaluations` is what a window costs (RK4: 4 per step), :attr:`passes` the DiT batches.
    ``guidance: baked`` is for a student trained toward the guided velocity (``train/distill.py``): one
    conditional pass per evaluation, ``guidance_scale`` only records the scale it was trained at. The
    ``shortcut`` solver needs such a student (``dit.step_embedding``): it is told each step's size.
    """

    # Defaults: the default mode's sampler, the cheapest setting of benchmarks/bench_fidelity.py whose error
    # to the converged solution is at most the reference's (Euler, 50 uniform steps): RK4 with 4 uniform
    # steps, 16 estimator evaluations per window, on the tiny model trained 5000 steps; see benchmarks/README.
    num_steps: int = 4
    guidance_scale: float = 1.5  # > 1: classifier-free guidance with a doubled (2B) batch; ≤ 1: no CFG
    solver: Solver = "rk4"
    sigma_min: float = SIGMA_MIN
    time_grid: TimeGrid = "uniform"
    grid_power: float = 2.0  # exponent of the "power" grid
    guidance: Literal["cfg", "baked"] = "cfg"

    def __post_init__(self) -> None:
        if self.solver not in get_args(Solver):
            raise ValueError(f"SamplerConfig: unknown solver {self.solver!r} ({' | '.join(get_args(Solver))})")
        if self.time_grid not in TIME_GRIDS:
            raise ValueError(f"SamplerConfig: unknown time_grid {self.time_grid!r} ({' | '.join(TIME_GRIDS)})")
        if self.num_steps < 1:
            raise ValueError(f"SamplerConfig: num_steps must be ≥ 1, got {self.num_steps}")
        if self.grid_power <= 0:
            raise ValueError(f"SamplerConfig: grid_power must be > 0, got {self.grid_power}")
        if self.guidance not in ("cfg", "baked"):
            raise ValueError(f"SamplerConfig: guidance must be 'cfg' or 'baked', got {self.guidance!r}")

    @property
    def evaluations(self) -> int:
        """Estimator calls per window (each a guided batch when ``guidance_scale > 1``)."""
        per_step = len(RUNGE_KUTTA[self.solver][0]) if self.solver in RUNGE_KUTTA else 1
        return per_step * self.num_steps

    @property
    def passes(self) -> int:
        """DiT passes per window: an evaluation with classifier-free guidance is a doubled batch."""
        return self.evaluations * (2 if self.sampling_scale > 1.0 else 1)

    @property
    def sampling_scale(self) -> float:
        """The guidance scale the sampler applies (1: none, the student has it baked in)."""
        return 1.0 if self.guidance == "baked" else self.guidance_scale


RELEASE_SAMPLER = SamplerConfig(num_steps=50, guidance_scale=1.5, solver="euler", time_grid="uniform")


def time_grid(num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t_span (N+1,), t (N,), dt (N,))`` float32, exactly as upstream steps through them.

    ``t_span`` follows torch's fp32 ``linspace`` (first half from the start, second half from the end);
    the solver's ``t`` accumulates ``t += dt`` with ``dt = t_span[k+1] − t`` re-read from the grid.
    """
    n = num_steps + 1
    step = np.float32(1) / np.float32(num_steps)
    idx = np.arange(n)
    t_span = np.where(idx < n // 2, idx.astype(np.float32) * step,
                      np.float32(1.0) - (n - 1 - idx).astype(np.float32) * step).astype(np.float32)
    ts, dts = np.zeros(num_steps, np.float32), np.zeros(num_steps, np.float32)
    t = t_span[0]
    for k in range(num_steps):
        ts[k] = t
        dts[k] = np.float32(t_span[k + 1] - t)
        t = np.float32(t + dts[k])
    return t_span, ts, dts


def sampler_times(config: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t_span, t, dt)`` of :func:`time_grid` for the config's grid (uniform: the reference's exactly)."""
    if config.time_grid == "uniform":
        return time_grid(config.num_steps)
    s = np.linspace(0.0, 1.0, config.num_steps + 1)
    t_span = s ** config.grid_power if config.time_grid == "power" else 1.0 - np.cos(0.5 * np.pi * s)
    t_span = t_span.astype(np.float32)
    t_span[-1] = 1.0
    return t_span, t_span[:-1], np.diff(t_span).astype(np.float32)


def adams_bashforth_weights(t_span: np.ndarray, order: int) -> np.ndarray:
    """``(N, order)`` float32: step n is ``x + dt_n · Σ_j w[n, j] · v(t_{n−j})``, the exact integral over
    ``[t_n, t_{n+1}]`` of the polynomial through the last ``min(order, n + 1)`` velocities (variable steps)."""
    t = t_span.astype(np.float64)
    weights = np.zeros((len(t) - 1, order))
    for n in range(len(t) - 1):
        nodes = t[n - np.arange(min(order, n + 1))]
        for j in range(len(nodes)):
            others = np.delete(nodes, j)
            basis = np.poly1d(np.poly(others)) / np.prod(nodes[j] - others)
            antiderivative = basis.integ()
            weights[n, j] = (antiderivative(t[n + 1]) - antiderivative(t[n])) / (t[n + 1] - t[n])
    return weights.astype(np.float32)


def guidance_batch(x: Array, prompt: Array, cond: Array, guidance_scale: float) -> Array:
    """The estimator input at one step: ``(B, T, in)`` without guidance, else ``(2B, T, in)`` with the
    unconditional half first (condition channels all zero, same state and prompt) and the conditional half
    second."""
    if guidance_scale <= 1.0:
        return estimator_input(x, prompt, cond)
    uncond = estimator_input(x, prompt, jnp.zeros_like(cond))
    return jnp.concatenate([uncond, estimator_input(x, prompt, cond)])


def guided_velocity(velocity: VelocityFn, x: Array, prompt: Array, cond: Array, t: Array,
                    guidance_scale: float) -> tuple[Array, Array, Array]:
    """``(v, v_uncond, v_cond)`` at scalar time ``t``, one estimator call on :func:`guidance_batch`;
    ``v = v_u + g·(v_c − v_u)`` (without guidance all three are the conditional velocity)."""
    b = x.shape[0]
    h = guidance_batch(x, prompt, cond, guidance_scale)
    vv = velocity(h, jnp.full((h.shape[0],), t, jnp.float32))
    if guidance_scale <= 1.0:
        return vv, vv, vv
    v_u, v_c = vv[:b], vv[b:]
    return v_u + guidance_scale * (v_c - v_u), v_u, v_c


def _combine(x: Array, dt: Array, weights: tuple[float, ...] | Array, ks: list[Array]) -> Array:
    """``x + dt · Σ w_i k_i`` (terms with a zero constant weight skipped; a lone weight 1 is not applied)."""
    terms = [(w, k) for w, k in zip(weights, ks, strict=True) if not (isinstance(w, float) and w == 0.0)]
    if len(terms) == 1 and isinstance(terms[0][0], float) and terms[0][0] == 1.0:
        return x + dt * terms[0][1]
    return x + dt * sum(w * k for w, k in terms)


def sample(velocity: VelocityFn, cond: Array, prompt: Array, prompt_len: Array, x0: Array,
           config: SamplerConfig, trace: bool = False) -> tuple[Array, dict[str, Array] | None]:
    """Integrate the flow from noise ``x0 (B, T, C)`` at t = 0 to latents at t = 1 (traceable, no host sync).
    The ``shortcut`` solver calls ``velocity(h, t, step)`` with the step size ``step (B',)``.

    ``cond (B, T, cond_dim)`` is the padding-filled condition (``mu``); ``prompt (B, T, C)`` the in-context
    latents (zero outside the prompt); ``prompt_len (B,)`` the prompt lengths L. At every estimator call
    the prompt frames are put back on the path, ``x[:, :L] = (1 − (1 − σ)t)·x0[:, :L] + t·prompt[:, :L]``,
    and at the end they are overwritten with the prompt. One ``lax.scan`` over the steps of
    :func:`sampler_times` with the config's solver. Returns ``(latents, trajectory)``; with ``trace`` the
    trajectory stacks per step ``x`` (the estimator's state input at the step's start), ``t``, ``v_uncond``,
    ``v_cond`` ``(N, ...)`` and holds ``est_in0``, the estimator input of step 0.
    """
    b, frames, channels = x0.shape
    if prompt.shape != x0.shape or cond.shape[:2] != (b, frames):
        raise ValueError(f"sampler: prompt {prompt.shape} / condition {cond.shape} do not match the noise "
                         f"{x0.shape}")
    on_prompt = prompt_mask(frames, prompt_len)[..., None]
    sigma, g = config.sigma_min, config.sampling_scale
    t_span, ts, dts = sampler_times(config)
    order = ADAMS_BASHFORTH.get(config.solver, 0)
    ab_weights = adams_bashforth_weights(t_span, order) if order else np.zeros((config.num_steps, 0), np.float32)

    def reimpose(x: Array, t: Array) -> Array:
        return jnp.where(on_prompt, (1 - (1 - sigma) * t) * x0 + t * prompt, x)

    def field(x: Array, t: Array, dt: Array) -> tuple[Array, Array, Array]:
        if config.solver == "shortcut":
            return guided_velocity(lambda h, tt: velocity(h, tt, jnp.full_like(tt, dt)), x, prompt, cond, t, g)
        return guided_velocity(velocity, x, prompt, cond, t, g)

    def runge_kutta(x: Array, t: Array, dt: Array, k0: Array) -> Array:
        c, a, weights = RUNGE_KUTTA[config.solver]
        ks = [k0]
        for c_i, a_i in zip(c[1:], a[1:], strict=True):
            t_i = t + c_i * dt
            ks.append(field(reimpose(_combine(x, dt, a_i, ks), t_i), t_i, dt)[0])
        return _combine(x, dt, weights, ks)

    def step(carry: tuple[Array, Array], grid: tuple[Array, Array, Array]) -> tuple[tuple, dict[str, Array]]:
        x, history = carry
        t, dt, w = grid
        x = reimpose(x, t)
        v, v_u, v_c = field(x, t, dt)
        record = dict(x=x, t=t, v_uncond=v_u, v_cond=v_c) if trace else {}
        if order:
            history = jnp.concatenate([v[None], history[:-1]])
            return (_combine(x, dt, tuple(w), list(history)), history), record
        return (runge_kutta(x, t, dt, v), history), record

    history = jnp.zeros((order, *x0.shape), x0.dtype)
    (x, _), records = jax.lax.scan(step, (x0, history), (jnp.asarray(ts), jnp.asarray(dts), jnp.asarray(ab_weights)))
    x = jnp.where(on_prompt, prompt, x)
    if not trace:
        return x, None
    records["est_in0"] = guidance_batch(reimpose(x0, jnp.float32(ts[0])), prompt, cond, g)
    records["t_span"] = jnp.asarray(t_span)
    return x, records


def make_sampler(model: DiTEstimator, config: SamplerConfig, trace: bool = False
                 ) -> Callable[..., tuple[Array, dict[str, Array] | None]]:
    """A jit-compiled sampler ``run(variables, cond, prompt, prompt_len, x0) -> (latents, trajectory)``.

    One compilation per input shape; the whole loop runs on device. ``x0`` is standard-normal float32 noise
    (upstream ``prepare_latents``, temperature 1).
    """

    @jax.jit
    def run(variables: dict, cond: Array, prompt: Array, prompt_len: Array, x0: Array):
        return sample(lambda h, t, *step: model.apply(variables, h, t, *step), cond, prompt, prompt_len, x0, config,
                      trace)

    return run


# ------------------------------------------------------------------------------------------- weights


def cfm_rules(config: DiTConfig) -> list[Rule]:
    """Rules for the flow part of the ``AudioDiffusion1D`` state dict: the estimator under ``estimator/``
    and ``zero_cond_embedding1`` (full reference key names)."""
    return [*prefixed(ESTIMATOR_PREFIX, dit_rules(config), target_prefix="estimator"),
            Rule(r"zero_cond_embedding1", "params/zero_cond_embedding1")]


def estimator_variables(variables: dict) -> dict:
    """The estimator's own variables out of a :func:`cfm_rules` tree."""
    return {"params": variables["params"]["estimator"], "buffers": variables["buffers"]["estimator"]}


def zero_condition(variables: dict) -> Array:
    """The learned condition of padding frames, ``zero_cond_embedding1 (cond_dim,)``, out of a
    :func:`cfm_rules` tree (what :func:`fill_padding` puts there)."""
    return variables["params"]["zero_cond_embedding1"]


class ConditionalFlow(nn.Module):
    """The flow component's variables: the DiT ``estimator`` and ``zero_cond_embedding1 (cond_dim,)``, the
    learned condition of padding frames (N(0, 1) at init). Calling it runs the estimator."""

    config: DiTConfig

    @nn.compact
    def __call__(self, h: Array, t: Array) -> Array:
        self.param("zero_cond_embedding1", nn.initializers.normal(1.0), (self.config.cond_dim,))
        return DiTEstimator(self.config, name="estimator")(h, t)


def derive_dit(key_shapes: KeyShapes, base: DiTConfig, files: ReleaseFiles) -> DiTConfig:
    """What ``model_config.json`` states (layers, heads, head size, channels, norm eps), the rest from the
    estimator's shapes: channels and layers when the file is absent, the position table length
    (``pos_embed.pe``), timestep channels, projection kernel and feed-forward multiple; without the file the
    head size of ``base``. The timestep scale and period from ``base``."""
    stated = files.get(DIT_CONFIG, {})
    for name, supported in (("activation_fn", "gelu-approximate"), ("norm_type", "ada_norm_single")):
        if stated.get(name, supported) != supported:
            raise DeriveError(f"{DIT_CONFIG}: {name} {stated[name]!r} is not supported (only {supported!r})")

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(key_shapes, ESTIMATOR_PREFIX + key, "flow")

    inner, in_channels, proj_kernel = shape("proj_in.ffn_1.weight")
    out_channels = stated.get("out_channels", shape("proj_out.ffn_2.weight")[0])
    in_channels = stated.get("in_channels", in_channels)
    head_dim = stated.get("attention_head_dim", base.attention_head_dim)
    num_layers = len(layer_indices(key_shapes, ESTIMATOR_PREFIX + "transformer_blocks."))
    return dataclasses.replace(
        base, num_layers=stated.get("num_layers", num_layers),
        num_attention_heads=stated.get("num_attention_heads", inner // head_dim), attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=out_channels, cond_dim=in_channels - 2 * out_channels,
        ff_mult=shape("transformer_blocks.0.ff.net.0.proj.weight")[0] // inner,
        norm_eps=stated.get("norm_eps", base.norm_eps),
        num_positional_embeddings=stated.get("num_positional_embeddings", shape("pos_embed.pe")[1]),
        timestep_channels=shape("adaln_single.emb.timestep_embedder.linear_1.weight")[1],
        proj_kernel_size=proj_kernel)


FLOW = Component(
    "flow", frozen=False, config_path="dit", module=ConditionalFlow, example_inputs=example_inputs,
    rules=cfm_rules, key_names=("cfm_wrapper", "zero_cond_embedding1"), derive=derive_dit)
