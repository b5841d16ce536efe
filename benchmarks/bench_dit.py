"""DiT decoder measurements (not a test; heavy). Run from the repo root:

``python benchmarks/bench_dit.py speed``      full-size estimator (random weights), one CFG Euler step at
                                             batch 1 → effective batch 2, 300 frames: compile time, time per
                                             step, achieved GFLOP/s vs a large fp32 matmul measured in the
                                             same run, peak memory. ``--layers 4`` keeps the full width with
                                             fewer blocks (a short measurement); ``--attention`` picks the
                                             kernel (DiTConfig.attention).
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
from almtok_jax.golden.configs import dit_config  # noqa: E402
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


def speed(frames: int, repeats: int, layers: int, attention: str) -> None:
    config = DiTConfig(num_layers=layers, attention=attention)
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
    print(f"full-width DiT, {layers} blocks: {n_params / 1e6:.1f} M params, CFG batch 2 x {frames} frames, fp32, "
          f"attention {attention}, {jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"compile (lower+compile): {compile_s:.1f} s")
    print(f"time per sampling step: {step_s:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"FLOPs per step (analytic): {flops / 1e12:.3f} TFLOP (spec §7: 1.13 for 32 blocks); XLA cost_analysis: "
          f"{xla_flops / 1e12:.3f} TFLOP (counts the scanned block body once)")
    print(f"achieved: {flops / step_s / 1e9:.1f} GFLOP/s; fp32 2048^3 matmul: {ref:.1f} GFLOP/s "
          f"({100 * flops / step_s / 1e9 / ref:.0f} %)")
    if memory is not None:
        print(f"compiled memory: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{memory.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"outputs {memory.output_size_in_bytes / 2**20:.1f} MiB")
    print(f"peak process RSS: {peak_rss_mib() / 1024:.2f} GiB")


def precision() -> None:
    """bf16 compute (fp32 params, residual stream, norms, softmax) against fp32 on dit_tiny."""
    fx = load_fixture(FIXTURES / "dit_tiny.npz")
    config = dit_config(fx.config)
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
    parser.add_argument("what", choices=["speed", "precision"])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=DiTConfig.num_layers, help="speed: DiT blocks")
    parser.add_argument("--attention", default=DiTConfig.attention, help="speed: DiTConfig.attention kernel")
    args = parser.parse_args()
    with jax.default_matmul_precision("highest"):
        if args.what == "speed":
            speed(args.frames, args.repeats, args.layers, args.attention)
        else:
            precision()


if __name__ == "__main__":
    main()
