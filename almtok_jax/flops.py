"""Matmul and convolution FLOPs of a traced program, counted on its jaxpr.

XLA's ``cost_analysis`` (CPU, GPU and the TPU compiler alike) counts the body of a ``while`` loop once, and
every scanned layer stack, sampler and gradient-accumulation loop compiles to one; counting on the jaxpr
multiplies each ``scan`` body by its length instead. Only ``dot_general`` and ``conv_general_dilated`` are
counted (2 x multiply-adds): elementwise work is a small share of these models and runs beside the MXU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax._src.interpreters.partial_eval import dce_jaxpr  # no public DCE of a jaxpr
from jax.extend.core import ClosedJaxpr, Jaxpr


def _eqn_flops(eqn) -> float:
    """Matmul / convolution FLOPs of one jaxpr equation (2 x MACs), recursing into sub-jaxprs."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) positions
        per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    subs = [v for v in eqn.params.values() if isinstance(v, (Jaxpr, ClosedJaxpr))]
    subs += [j for v in eqn.params.values() if isinstance(v, tuple) for j in v
             if isinstance(j, (Jaxpr, ClosedJaxpr))]
    total = sum(jaxpr_flops(s) for s in subs)
    if name == "scan":
        total *= eqn.params["length"]
    elif name == "cond":
        total = max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
    return total


def jaxpr_flops(jaxpr: Jaxpr | ClosedJaxpr) -> float:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(_eqn_flops(e) for e in jaxpr.eqns)


def matmul_flops(fn: Callable, *args: Any) -> float:
    """Matmul + convolution FLOPs of ``fn(*args)`` over the whole (global) batch, scans counted ``length``
    times (while loops once), after dead-code elimination (XLA drops work no output needs, e.g. an unused
    query-encoder pass). ``args`` may be ``ShapeDtypeStruct``s."""
    return program_flops(jax.make_jaxpr(fn)(*args))


def program_flops(jaxpr: Jaxpr | ClosedJaxpr) -> float:
    """:func:`matmul_flops` of a traced program (``jax.jit(f).trace(...).jaxpr``)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return jaxpr_flops(dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0])
