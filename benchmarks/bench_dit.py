"""DiT decoder measurements (not a test; heavy). Run from the repo root:

``python benchmarks/bench_dit.py speed``      full-size estimator (random weights), one CFG Euler step at
                                             batch 1 → effective batch 2, 300 frames: compile time, time per
                                             step, achieved GFLOP/s vs a large fp32 matmul, peak memory.
``python benchmarks/bench_dit.py solvers``    midpoint vs Euler step counts on the tiny sampler fixture's DiT.
``python benchmarks/bench_dit.py precision``  bf16-compute vs fp32 error on the dit_tiny fixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import peak_rss_mib, timed  # noqa: E402

from almtok_jax.flow.cfm import FLOW, SamplerConfig, estimator_variables, make_sampler  # noqa: E402
from almtok_jax.flow.dit import (  # noqa: E402
    ESTIMATOR_PREFIX,
    DiTConfig,
    DiTEstimator,
    dit_rules,
    init_shapes,
)
from almtok_jax.golden.runner import load_fixture  # noqa: E402
from almtok_jax.mapping import convert_state_dict, prefixed  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures" / "core"


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` fp32 ``(n, n) @ (n, n)`` throughput, the machine's reference GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, a))
    return 2 * n**3 / min(timed(mm, a, a, repeats=repeats)[0]) / 1e9


def forward_flops(config: DiTConfig, batch: int, frames: int) -> float:
    """Analytic FLOPs (2 × MACs) of one estimator forward (spec 03 §7); XLA's cost_analysis counts a
    scan body once, so it under-reports the stacked blocks."""
    d, t, k = config.inner_dim, frames, config.proj_kernel_size
    proj_in = 2 * t * config.in_channels * k * d + 2 * t * d * d
    blocks = config.num_layers * (4 * 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * config.ff_mult * d)
    proj_out = 2 * t * d * k * config.out_channels + 2 * t * config.out_channels ** 2
    timestep = 2 * (config.timestep_channels * d + d * d + d * 6 * d)
    return batch * (proj_in + blocks + proj_out + timestep)


def dit_random_variables(config: DiTConfig) -> dict:
    """Full-size estimator variables from the flow component's own initializers (the real position table)."""
    return estimator_variables(jax.jit(FLOW.init, static_argnums=0)(config, jax.random.key(0)))


def speed(frames: int, repeats: int) -> None:
    config = DiTConfig()
    model = DiTEstimator(config)
    variables = dit_random_variables(config)
    run = make_sampler(model, SamplerConfig(num_steps=1))
    key = jax.random.split(jax.random.key(1), 3)
    cond = jax.random.normal(key[0], (1, frames, config.cond_dim))
    prompt = jnp.zeros((1, frames, config.out_channels))
    prompt_len = jnp.zeros((1,), jnp.int32)
    x0 = jax.random.normal(key[2], (1, frames, config.out_channels))
    args = (variables, cond, prompt, prompt_len, x0)

    start = time.perf_counter()
    compiled = run.lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan")))
    flops = forward_flops(config, 2, frames)
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))  # warm-up: first touch of the weight buffers, thread pools
    times, _ = timed(compiled, *args, repeats=repeats)
    step_s = statistics.median(times)
    ref = matmul_gflops()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    print(f"full-size DiT: {n_params / 1e6:.1f} M params, CFG batch 2 x {frames} frames, fp32, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"compile (lower+compile): {compile_s:.1f} s")
    print(f"time per sampling step: {step_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"FLOPs per step (analytic): {flops / 1e12:.3f} TFLOP (spec §7: 1.13); XLA cost_analysis: "
          f"{xla_flops / 1e12:.3f} TFLOP (counts the scanned block body once)")
    print(f"achieved: {flops / step_s / 1e9:.1f} GFLOP/s; fp32 2048^3 matmul: {ref:.1f} GFLOP/s "
          f"({100 * flops / step_s / 1e9 / ref:.0f} %)")
    if memory is not None:
        print(f"compiled memory: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{memory.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"outputs {memory.output_size_in_bytes / 2**20:.1f} MiB")
    print(f"peak process RSS: {peak_rss_mib() / 1024:.2f} GiB")


def _sampler_fixture():
    fx = load_fixture(FIXTURES / "sampler.npz")
    config = DiTConfig.from_fixture(fx.config)
    variables = FLOW.load(fx.state_dict, config, source=fx.path.name)
    return fx, config, estimator_variables(variables)


def smooth_in_time(variables: dict, config: DiTConfig, max_rad: float) -> dict:
    """Zero the timestep-MLP inputs of features faster than ``max_rad`` radians per unit t.

    Random weights use all 256 frequencies (up to 1000 rad per unit t), so v(t) is rough on the sampling
    grid; a trained model's field is much smoother in t. This emulates that for the solver study.
    """
    half = config.timestep_channels // 2
    rate = config.timestep_scale * np.exp(-np.log(config.timestep_max_period) * np.arange(half) / half)
    keep = np.tile(rate <= max_rad, 2).astype(np.float32)[:, None]
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    t_mlp = dict(params["adaln_single"])
    t_mlp["linear_1"] = {**t_mlp["linear_1"], "kernel": t_mlp["linear_1"]["kernel"] * keep}
    return {**variables, "params": {**params, "adaln_single": t_mlp}}


def solvers(smooth_rad: float | None) -> None:
    """Final-latent error against a 1000-step Euler solution, per solver and step count."""
    fx, config, variables = _sampler_fixture()
    if smooth_rad is not None:
        variables = smooth_in_time(variables, config, smooth_rad)
    model = DiTEstimator(config)
    mu = jnp.asarray(fx.expected["mu_prefix"])
    prompt = jnp.asarray(fx.expected["incontext_latents_prefix"])
    prompt_len = jnp.asarray([int(fx.inputs["incontext_length_prefix"])])
    x0 = jnp.asarray(fx.inputs["rng_noise_prefix"])

    def final(solver: str, steps: int) -> np.ndarray:
        run = make_sampler(model, SamplerConfig(num_steps=steps, solver=solver))
        return np.asarray(run(variables, mu, prompt, prompt_len, x0)[0])

    exact = final("euler", 1000)
    euler50 = final("euler", 50)
    base = np.mean(np.abs(euler50 - exact))
    smooth = "all timestep frequencies" if smooth_rad is None else f"timestep frequencies <= {smooth_rad} rad"
    print(f"sampler fixture DiT (T 16, CFG 1.5, prompt 5, {smooth}); reference = Euler 1000 steps")
    print(f"euler    50 steps ( 50 NFE): mean |x - ref| {base:.2e}")
    for steps in (2, 3, 4, 5, 6, 8, 10, 15, 20, 25):
        mid = final("midpoint", steps)
        print(f"midpoint {steps:2d} steps ({2 * steps:3d} NFE): mean |x - ref| "
              f"{np.mean(np.abs(mid - exact)):.2e}, mean |x - euler50| {np.mean(np.abs(mid - euler50)):.2e}")
    for steps in (10, 20, 25):
        print(f"euler    {steps:2d} steps ({steps:3d} NFE): mean |x - ref| "
              f"{np.mean(np.abs(final('euler', steps) - exact)):.2e}")


def precision() -> None:
    """bf16 compute (fp32 params, residual stream, norms, softmax) against fp32 on dit_tiny."""
    fx = load_fixture(FIXTURES / "dit_tiny.npz")
    config = DiTConfig.from_fixture(fx.config)
    variables = convert_state_dict(fx.state_dict, prefixed(ESTIMATOR_PREFIX, dit_rules(config)),
                                   expected=init_shapes(config))
    fp32 = jax.jit(DiTEstimator(config).apply)
    bf16 = jax.jit(DiTEstimator(dataclasses.replace(config, dtype="bfloat16")).apply)
    for case in ("a", "b"):
        h, t = fx.inputs[f"hidden_{case}"], fx.inputs[f"timestep_{case}"]
        ref = np.asarray(fp32(variables, h, t))
        low = np.asarray(bf16(variables, h, t))
        scale = np.max(np.abs(ref))
        vs_expected = np.max(np.abs(ref - fx.expected[f"out_{case}"]))
        print(f"case {case} {h.shape}: fp32 vs expected max {vs_expected:.1e}; "
              f"bf16 vs fp32 max {np.max(np.abs(low - ref)):.2e}, mean {np.mean(np.abs(low - ref)):.2e} "
              f"(output max |v| {scale:.2f}, relative max {np.max(np.abs(low - ref)) / scale:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "solvers", "precision"])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smooth-rad", type=float, default=None,
                        help="solvers: keep only timestep features up to this many rad per unit t")
    args = parser.parse_args()
    with jax.default_matmul_precision("highest"):
        if args.what == "speed":
            speed(args.frames, args.repeats)
        elif args.what == "solvers":
            solvers(args.smooth_rad)
        else:
            precision()


if __name__ == "__main__":
    main()
