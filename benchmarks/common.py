"""Helpers shared by the benchmark scripts: fresh model variables, timing, peak memory, one child process
per measured configuration."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax


def model_variables(config: Any, names: tuple[str, ...], key: jax.Array) -> dict:
    """Fresh variables of the named components (:func:`almtok_jax.model.init_variables`: the modules' own
    initializers, the path training takes), built on the device."""
    from almtok_jax.model import init_variables

    return jax.block_until_ready(jax.jit(init_variables, static_argnums=(0, 2))(config, key, names))


def timed(fn: Callable, *args, repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeats`` calls of ``fn(*args)``, each up to ``block_until_ready``, and the last
    call's output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times, out


def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux) in MiB: a process-wide
    high-water mark (Python + JAX runtime, weights, compilation, XLA buffers), hence one process per
    measured configuration."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now (``VmRSS`` of ``/proc/self/status``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> dict:
    """Where the numbers come from: device, CPU, core count, JAX version, load averages (1, 5, 15 min)."""
    return {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run_child_process(script: str, args: Sequence[str]) -> dict:
    """Run ``python script *args`` in a fresh process; its last stdout line is a JSON object, returned."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
