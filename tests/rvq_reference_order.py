"""Replays an ``rvq_train`` fixture's gradients w.r.t. ``project_in`` in the reference's float32 order.

Run as a script in a process whose XLA does not contract multiply-adds (``--xla_cpu_max_isa=AVX``), as the
reference's CPU kernels did not. Our own training forward and rotation-trick backward (scanned over the
layers) give the gradient at ``project_in``'s output, ``g (M, C)``; only the two plain matrix reductions
around it are replayed in the order of the reference's libraries (not ours to choose inside XLA):

- ``project_out`` backward ``G @ W_out`` and ``project_in``'s weight gradient ``g^T x``: one fused
  multiply-add per row, rows in order (the BLAS kernel the reference ran);
- ``project_in``'s bias gradient ``sum_rows g``: four interleaved partial sums (rows l, l+4, ...), added
  in order (the reference's vectorised sum).

Prints one JSON object: the largest ``|ours - expected|`` of every per-layer output and of every
``grad_q_project_in.*`` array.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.golden.quantizer import rvq_variables
from almtok_jax.golden.runner import load_fixture
from almtok_jax.quantizer.rvq import residual_quantize_train


def fma_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^T b`` for ``a (M, I)``, ``b (M, J)``: rows accumulated in order, one rounding per row (an FMA:
    the float32 product is exact in float64)."""
    acc = np.zeros((a.shape[1], b.shape[1]), np.float32)
    for a_row, b_row in zip(a.astype(np.float64), b.astype(np.float64), strict=True):
        acc = (acc + np.outer(a_row, b_row)).astype(np.float32)
    return acc


def interleaved_sum(a: np.ndarray, lanes: int = 4) -> np.ndarray:
    """Sum over rows of ``a (M, C)`` with ``lanes`` interleaved float32 partial sums, added in order."""
    partial = []
    for lane in range(lanes):
        acc = np.zeros(a.shape[1], np.float32)
        for row in a[lane::lanes]:
            acc = acc + row
        partial.append(acc)
    total = partial[0]
    for p in partial[1:]:
        total = total + p
    return total


def replay(path: str) -> dict[str, float]:
    fx = load_fixture(path)
    model, variables = rvq_variables(fx)
    config = model.config
    codebook = variables["codebook"]
    state = tuple(codebook[n] for n in ("embed", "embed_avg", "cluster_size"))
    w_out = np.asarray(variables["params"]["project_out"]["kernel"])  # (codebook_dim, dim)
    key = jax.random.key(0)  # dead-code replacement never triggers in rvq_train fixtures
    errors = {}
    for s in range(sum(name.startswith("x_step") for name in fx.inputs)):
        x = fx.inputs[f"x_step{s}"].reshape(-1, config.dim)
        cotangent = fx.inputs[f"cotangent_step{s}"].reshape(-1, config.dim)
        r0 = jnp.asarray(fx.expected[f"layer0_residual_in_step{s}"].reshape(-1, config.codebook_dim))

        def layer_outputs(r, state=state):
            return residual_quantize_train(r, state, key, config)[0]["outputs"]

        outputs, vjp = jax.vjp(layer_outputs, r0)
        grad_sum = fma_rows(cotangent.T, w_out.T)  # every layer output receives G @ W_out
        (grad_r0,) = jax.jit(vjp)(jnp.broadcast_to(grad_sum, outputs.shape))
        grad_r0 = np.asarray(grad_r0)
        for i in range(config.num_quantizers):
            expected = fx.expected[f"layer{i}_out_step{s}"].reshape(outputs.shape[1:])
            errors[f"layer{i}_out_step{s}"] = float(np.abs(np.asarray(outputs[i]) - expected).max())
        weight = fma_rows(grad_r0, x)
        errors[f"grad_q_project_in.weight_step{s}"] = float(
            np.abs(weight - fx.expected[f"grad_q_project_in.weight_step{s}"]).max())
        errors[f"grad_q_project_in.bias_step{s}"] = float(
            np.abs(interleaved_sum(grad_r0) - fx.expected[f"grad_q_project_in.bias_step{s}"]).max())
        state = tuple(jnp.asarray(np.stack([fx.expected[f"step{s}.vq_embed.layers.{i}._codebook.{n}"][0]
                                            for i in range(config.num_quantizers)]))
                      for n in ("embed", "embed_avg", "cluster_size"))
    return errors


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    print(json.dumps(replay(sys.argv[1])))
