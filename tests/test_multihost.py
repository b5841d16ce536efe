"""Multi-process training for real: ``train.py`` on 2 processes x 4 CPU devices, joined by
``jax.distributed`` on a localhost coordinator (gloo collectives), launched the way a cluster launches it
(only ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` differ per process).

Runs (tiny config, ``mesh.data=1 mesh.fsdp=8``: parameters and Adam state split over both processes):

* ``multi``: 2 processes x 4 devices, steps 1-6 uninterrupted, checkpoints at 3 and 6;
* ``single``: 1 process x 8 devices, steps 1-6 uninterrupted;
* ``resumed``: 1 process x 8 devices restarting from the 2-process step-3 checkpoint, steps 4-6, against
  the uninterrupted ``multi`` run it continues.

The schedule horizon is set to 4 steps, so the runs go past it: the learning rate must stay at its final
value and each process's log must say so once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
AUDIO = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve() / "audio"
SPLIT, STEPS, HORIZON = 3, 6, 4
TIMEOUT_S = 900
PAST_HORIZON = "past the schedule horizon"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, steps: int, devices: int, cluster: dict[str, str] | None = None,
            resume: bool = False) -> tuple[subprocess.Popen, Path]:
    """Start one ``train.py`` process; its output goes to a file (a full pipe would stall it, and with it
    the collectives of the other process)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(workdir.parent / "jax_cache")),
           **(cluster or {})}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if cluster is None:
            env.pop(key, None)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "train_tiny.yaml"),
           "--workdir", str(workdir), "--steps", str(steps), *(["--resume"] if resume else []),
           f"data.train={AUDIO / 'speech'}", "mesh.data=1", "mesh.fsdp=8", f"checkpoint.every={SPLIT}",
           f"schedule.total_steps={HORIZON}"]
    log = workdir.parent / f"{workdir.name}-{(cluster or {}).get('JAX_PROCESS_ID', 0)}.log"
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> list[str]:
    """Outputs of ``procs``; every process is killed if one fails or the time runs out."""
    try:
        for p, _ in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {TIMEOUT_S} s: {err.cmd}")
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for _, log in procs]
    for (p, _), out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outputs


def _losses(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multihost")
    address = f"localhost:{_free_port()}"
    multi = [_launch(root / "multi", STEPS, 4, {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                                 "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    single = _launch(root / "single", STEPS, 8)
    outputs = {"multi": _wait(multi), "single": _wait([single])[0]}
    shutil.copytree(root / "multi" / "checkpoints" / str(SPLIT), root / "resumed" / "checkpoints" / str(SPLIT))
    outputs["resumed"] = _wait([_launch(root / "resumed", STEPS, 8, resume=True)])[0]
    return {"root": root, "outputs": outputs, **{k: _losses(root / k) for k in ("multi", "single", "resumed")}}


KEYS = ("loss", "loss_flow", "loss_commit", "loss_phone", "grad_norm")
# Same data, same program, but gloo sums across the 2 processes in another order than the in-process
# all-reduce: the first step from a given state agrees to float32 rounding (measured <= 1.1e-7 at step 1);
# after it the large early gradients (norm ~3600, clipped to 2) amplify the rounding. Measured: steps 2-3
# losses <= 8.4e-5, gradient norm 2.4e-3. A wrong batch or state moves some term by percents.
RTOL_FIRST, RTOL_LOSS, RTOL_GRAD_NORM = 1e-6, 2e-3, 1e-2


def _compare(run: dict, reference: dict, steps: range) -> None:
    for key in KEYS:
        for step in steps:
            rtol = RTOL_FIRST if step == steps[0] else RTOL_GRAD_NORM if key == "grad_norm" else RTOL_LOSS
            np.testing.assert_allclose(run[step][key], reference[step][key], rtol=rtol, err_msg=f"{key} {step}")


def test_two_processes_ran_as_one_job(runs):
    for out in runs["outputs"]["multi"]:
        assert "distributed: process" in out and "of 2" in out
    assert (runs["root"] / "multi" / "checkpoints" / str(SPLIT) / "state").is_dir()


def test_two_processes_match_one_process(runs):
    assert sorted(runs["multi"]) == list(range(1, STEPS + 1))
    _compare(runs["multi"], runs["single"], range(1, SPLIT + 1))


def test_one_process_resumes_the_two_process_checkpoint(runs):
    assert sorted(runs["resumed"]) == list(range(SPLIT + 1, STEPS + 1))
    assert f"resumed from step {SPLIT}" in runs["outputs"]["resumed"]
    _compare(runs["resumed"], runs["multi"], range(SPLIT + 1, STEPS + 1))


def test_learning_rate_holds_past_the_horizon_and_the_log_says_so_once(runs):
    lrs = [runs["single"][s]["lr"] for s in range(1, STEPS + 1)]
    assert lrs[HORIZON - 1] > 0 and lrs[HORIZON] == lrs[HORIZON + 1] < 1e-12, lrs  # updates 5, 6: counts 4, 5
    assert all(out.count(PAST_HORIZON) == 1 for out in (runs["outputs"]["single"], *runs["outputs"]["multi"]))
