"""Flow decoder properties on a tiny random DiT (golden parity is in test_golden.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from almtok_jax.flow.cfm import (
    RELEASE_SAMPLER,
    SOLVER_ORDER,
    SOLVERS,
    FlowLossConfig,
    FlowLossDraws,
    SamplerConfig,
    flow_matching_loss,
    loss_weights,
    make_sampler,
    sample,
    sampler_times,
)
from almtok_jax.flow.dit import DiTConfig, DiTEstimator

CFG = DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=2 * 4 + 8,
                out_channels=4, cond_dim=8, num_positional_embeddings=24, timestep_channels=16)
B, T = 2, 12


@pytest.fixture(scope="module")
def model_vars():
    model = DiTEstimator(CFG)
    h = jnp.zeros((1, T, CFG.in_channels))
    return model, jax.jit(model.init)(jax.random.key(0), h, jnp.zeros((1,)))


def _inputs(seed: int = 1, b: int = B):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    cond = jax.random.normal(k1, (b, T, CFG.cond_dim))
    prompt_full = jax.random.normal(k2, (b, T, CFG.out_channels))
    x0 = jax.random.normal(k3, (b, T, CFG.out_channels))
    prompt_len = jnp.array([3, 5, 0, 1][:b])
    prompt = jnp.where(jnp.arange(T)[None, :, None] < prompt_len[:, None, None], prompt_full, 0.0)
    return cond, prompt, prompt_len, x0


def test_sampler_compiles_once_per_shape(model_vars):
    model, variables = model_vars
    run = make_sampler(model, SamplerConfig(num_steps=3))
    for seed in (1, 2):
        latents, _ = run(variables, *_inputs(seed))
        assert latents.shape == (B, T, CFG.out_channels)
    assert run._cache_size() == 1
    run(variables, *_inputs(3, b=1))
    assert run._cache_size() == 2


def test_guidance_batch_equals_single_runs(model_vars):
    model, variables = model_vars
    run = make_sampler(model, SamplerConfig(num_steps=3, guidance_scale=2.0))
    cond, prompt, prompt_len, x0 = _inputs()
    both, _ = run(variables, cond, prompt, prompt_len, x0)
    for i in range(B):
        one, _ = run(variables, cond[i:i + 1], prompt[i:i + 1], prompt_len[i:i + 1], x0[i:i + 1])
        np.testing.assert_allclose(both[i:i + 1], one, atol=2e-5)


def test_prompt_frames_are_exact_at_the_end(model_vars):
    model, variables = model_vars
    cond, prompt, prompt_len, x0 = _inputs()
    for solver in SOLVERS:
        latents, _ = make_sampler(model, SamplerConfig(num_steps=2, solver=solver))(
            variables, cond, prompt, prompt_len, x0)
        for i, n in enumerate(np.asarray(prompt_len)):
            np.testing.assert_array_equal(latents[i, :n], prompt[i, :n])
            assert not np.allclose(latents[i, n:], 0.0)


def test_trajectory_reimposes_prompt_on_path(model_vars):
    model, variables = model_vars
    cond, prompt, prompt_len, x0 = _inputs()
    config = SamplerConfig(num_steps=4)
    run = jax.jit(lambda v, *a: sample(lambda h, t: model.apply(v, h, t), *a, config, trace=True))
    _, traj = run(variables, cond, prompt, prompt_len, x0)
    _, ts, _ = sampler_times(config)
    for k, t in enumerate(ts):
        want = (1 - (1 - config.sigma_min) * t) * x0[0, :3] + t * prompt[0, :3]
        np.testing.assert_allclose(traj["x"][k][0, :3], want, atol=1e-6)
    assert traj["est_in0"].shape == (2 * B, T, CFG.in_channels)


def test_length_beyond_position_table_raises(model_vars):
    model, variables = model_vars
    h = jnp.zeros((1, CFG.num_positional_embeddings + 1, CFG.in_channels))
    with pytest.raises(ValueError, match="position table"):
        model.apply(variables, h, jnp.zeros((1,)))


def test_timestep_must_match_batch(model_vars):
    model, variables = model_vars
    with pytest.raises(ValueError, match="timestep"):
        model.apply(variables, jnp.zeros((2, T, CFG.in_channels)), jnp.zeros((1,)))


def _draws(masks_shape, prefix=None, cfg_u=(0.5, 0.5), t=(0.3, 0.7)):
    b, frames = masks_shape
    z = jax.random.normal(jax.random.key(7), (b, frames, CFG.out_channels))
    use = prefix is not None
    return FlowLossDraws(jnp.asarray(use), jnp.asarray(prefix or [0] * b), jnp.asarray(cfg_u),
                         jnp.asarray(t), z)


def test_loss_weights_and_normalisation():
    masks = jnp.array([[2, 2, 1, 0], [0, 1, 2, 2]])
    np.testing.assert_array_equal(loss_weights(masks, 0.01), np.float32([[1, 1, 0, 0.01], [0.01, 0, 1, 1]]))
    k1, k2 = jax.random.split(jax.random.key(3))
    x1 = jax.random.normal(k1, (2, 4, CFG.out_channels))
    cond = jax.random.normal(k2, (2, 4, CFG.cond_dim))
    err = jnp.ones((2, 4, CFG.out_channels))
    config = FlowLossConfig()
    draws = _draws(masks.shape)

    def off_by_one(h, t):  # predicts u + 1 exactly: squared error 1 everywhere
        y = h[..., :CFG.out_channels]
        tb = t[:, None, None]
        z = (y - tb * x1) / (1 - (1 - config.sigma_min) * tb)
        return x1 - (1 - config.sigma_min) * z + err

    loss, _ = jax.jit(lambda *a: flow_matching_loss(off_by_one, *a, config))(
        x1, cond, masks, jnp.zeros(CFG.cond_dim), draws)
    w = np.array([[1, 1, 0, 0.01], [0.01, 0, 1, 1]])
    np.testing.assert_allclose(loss, np.sum(w**2) / np.sum(w), rtol=1e-4)  # numerator w², denominator w


def test_per_device_normalisation_averages_the_groups_own_ratios():
    """``groups=2`` (``loss_normalization: per_device`` on 2 devices): Σw²/Σw per half of the batch, averaged
    (the reference's per-GPU loss under DDP), which differs from the global ratio when the halves' weights do."""
    masks = jnp.array([[2, 2, 2, 2], [2, 2, 0, 0], [2, 0, 0, 0], [1, 2, 2, 0]])
    x1 = jax.random.normal(jax.random.key(5), (4, 4, CFG.out_channels))
    config = FlowLossConfig()

    def off_by_one(h, t):  # squared error 1 everywhere
        tb = t[:, None, None]
        z = (h[..., :CFG.out_channels] - tb * x1) / (1 - (1 - config.sigma_min) * tb)
        return x1 - (1 - config.sigma_min) * z + 1.0

    def loss(groups):
        return jax.jit(lambda *a: flow_matching_loss(off_by_one, *a, config, groups)[0])(
            x1, jnp.zeros((4, 4, CFG.cond_dim)), masks, jnp.zeros(CFG.cond_dim),
            _draws(masks.shape, cfg_u=(0.5,) * 4, t=(0.2, 0.4, 0.6, 0.8)))

    w = np.asarray(loss_weights(masks, config.padding_weight))
    per_half = [np.sum(w[rows] ** 2) / np.sum(w[rows]) for rows in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(loss(2), np.mean(per_half), rtol=1e-4)
    np.testing.assert_allclose(loss(1), np.sum(w ** 2) / np.sum(w), rtol=1e-4)
    assert abs(float(loss(2)) - float(loss(1))) > 1e-3
    with pytest.raises(ValueError, match="does not split into 3"):
        loss(3)


def test_loss_prefix_padding_fill_and_cfg_dropout():
    masks = jnp.array([[2] * 6, [2] * 4 + [0] * 2])
    x1 = jnp.ones((2, 6, CFG.out_channels))
    cond = jnp.ones((2, 6, CFG.cond_dim))
    zero_cond = jnp.full((CFG.cond_dim,), 5.0)
    draws = _draws(masks.shape, prefix=[2, 5], cfg_u=(0.05, 0.5))
    _, aux = jax.jit(lambda *a: flow_matching_loss(lambda h, t: h[..., :CFG.out_channels], *a,
                                                   FlowLossConfig()))(x1, cond, masks, zero_cond, draws)
    np.testing.assert_array_equal(aux["latent_masks"], [[1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(aux["cond"][0], 0.0)  # dropped sample: all frames zero
    np.testing.assert_array_equal(aux["cond"][1, :5], 1.0)
    np.testing.assert_array_equal(aux["cond"][1, 5], 5.0)  # padding frame filled
    np.testing.assert_array_equal(aux["incontext"][:, :, 0], [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])


def test_bf16_compute_close_to_fp32(model_vars):
    model, variables = model_vars
    h = jax.random.normal(jax.random.key(4), (B, T, CFG.in_channels))
    t = jnp.array([0.2, 0.9])
    ref = jax.jit(model.apply)(variables, h, t)
    low = jax.jit(DiTEstimator(dataclasses.replace(CFG, dtype="bfloat16")).apply)(variables, h, t)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_remat_gives_same_gradients(model_vars):
    model, variables = model_vars
    h = jax.random.normal(jax.random.key(5), (B, T, CFG.in_channels))
    t = jnp.array([0.2, 0.9])
    remat = DiTEstimator(dataclasses.replace(CFG, remat_policy="nothing_saveable"))

    def grads(m):
        loss = lambda p: jnp.sum(m.apply({**variables, "params": p}, h, t) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(variables["params"])

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads(model), grads(remat))


def _linear_ode_error(solver: str, steps: int, grid: str) -> float:
    """Max error at t = 1 of the real sampler on ``dx/dt = (λ + μ t)·x`` (stand-in velocity field, CFG on:
    the field ignores the condition, so both halves agree), exact solution ``x0 · exp(λ + μ/2)``."""
    lam, mu = -0.7, 2.5
    config = SamplerConfig(num_steps=steps, solver=solver, time_grid=grid, guidance_scale=1.5)
    x0 = jax.random.normal(jax.random.key(0), (2, 5, 3))

    def field(h, t):
        return (lam + mu * t)[:, None, None] * h[..., :3]

    run = jax.jit(lambda x: sample(field, jnp.ones((2, 5, 4)), jnp.zeros_like(x), jnp.zeros((2,), jnp.int32), x,
                                   config)[0])
    with jax.default_matmul_precision("highest"):
        x1 = np.asarray(run(x0), np.float64)
    return float(np.max(np.abs(x1 - np.asarray(x0, np.float64) * np.exp(lam + mu / 2))))


@pytest.mark.parametrize("grid", ["uniform", "power", "cosine"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_each_solver_converges_at_its_order(solver, grid):
    """Halving the step divides the error by about 2^order (steps small enough to stay above float32)."""
    order = SOLVER_ORDER[solver]
    coarse = {1: 32, 2: 16, 4: 6}[order]
    ratio = _linear_ode_error(solver, coarse, grid) / _linear_ode_error(solver, 2 * coarse, grid)
    assert 2 ** (order - 0.4) < ratio < 2 ** (order + 0.6), f"{solver}/{grid}: error ratio {ratio:.2f}"


def test_evaluations_per_window():
    assert SamplerConfig(num_steps=50, solver="euler").evaluations == 50
    assert SamplerConfig(num_steps=8, solver="heun").evaluations == 16
    assert SamplerConfig(num_steps=5, solver="rk4").evaluations == 20
    assert SamplerConfig(num_steps=10, solver="ab2").evaluations == 10
    with pytest.raises(ValueError, match="time_grid"):
        SamplerConfig(time_grid="log")


def test_default_sampler_is_the_benchmarked_setting():
    """Default mode: the cheapest setting that qualified in benchmarks/bench_fidelity.py (benchmarks/README):
    RK4, 4 uniform steps, 16 estimator evaluations per window. Release mode: the reference's Euler, 50
    uniform steps."""
    default = SamplerConfig()
    assert (default.solver, default.time_grid, default.num_steps, default.evaluations) == ("rk4", "uniform", 4, 16)
    assert (RELEASE_SAMPLER.solver, RELEASE_SAMPLER.time_grid, RELEASE_SAMPLER.num_steps,
            RELEASE_SAMPLER.evaluations) == ("euler", "uniform", 50, 50)
