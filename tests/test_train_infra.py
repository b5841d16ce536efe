"""Training infrastructure with the toy task: convergence, mesh equivalence, FSDP placement, exact resume,
NaN skipping, corrupt-file skipping, schedule, decay mask, model directories.

The multi-device runs are ``train.py`` subprocesses on 8 virtual CPU devices (another test module may have
initialised jax in this process already); the rest runs in process on one device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from almtok_jax.train.checkpoint import load_model_dir, save_model_dir
from almtok_jax.train.config import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from almtok_jax.train.data import make_loader
from almtok_jax.train.sharding import leaf_spec
from almtok_jax.train.state import (
    decay_mask,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    path_names,
    toy_task,
)

REPO = Path(__file__).resolve().parents[1]
AUDIO = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve() / "audio"
TOY = REPO / "configs" / "train_toy.yaml"


def _clip_folder(root: Path) -> Path:
    """6 speech clips at 24 kHz and 2 at 48 kHz (exercises the resampler)."""
    folder = root / "clips"
    folder.mkdir()
    for p in sorted((AUDIO / "speech").glob("*.wav"))[:6] + sorted((AUDIO / "speech48k").glob("*.wav"))[:2]:
        (folder / p.name).symlink_to(p)
    return folder


def _start(workdir: Path, steps: int, *args: str, resume: bool = False) -> tuple[Path, subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(TOY), "--workdir", str(workdir),
           "--steps", str(steps), *(["--resume"] if resume else []), *args]
    return workdir, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)


def _finish(run: tuple[Path, subprocess.Popen]) -> list[dict]:
    workdir, proc = run
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    clips = f"data.train={_clip_folder(root)}"
    full = _start(root / "full", 30, clips, "mesh.data=8", "mesh.fsdp=1", "checkpoint.keep=3")
    fsdp = _start(root / "fsdp", 10, clips, "mesh.data=2", "mesh.fsdp=4")
    results = {"full": _finish(full), "root": root}
    # A run that died after its step-10 checkpoint: restart from that checkpoint.
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "full" / "checkpoints" / "10", root / "resumed" / "checkpoints" / "10")
    resumed = _start(root / "resumed", 20, clips, "mesh.data=8", "mesh.fsdp=1", resume=True)
    results["fsdp"] = _finish(fsdp)
    results["resumed"] = _finish(resumed)
    return results


def _losses(records: list[dict], first: int, last: int) -> np.ndarray:
    by_step = {r["step"]: r["loss"] for r in records if "split" not in r}
    return np.array([by_step[s] for s in range(first, last + 1)])


def test_metrics_lines_and_loss_goes_down(runs):
    records = runs["full"]
    for key in ("step", "loss", "loss_flow", "loss_commit", "loss_phone", "grad_norm", "lr", "skipped"):
        assert key in records[0]
    losses = _losses(records, 1, 30)
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    assert records[0]["lr"] == 0.0 and records[-1]["skipped"] == 0


def test_data_and_fsdp_meshes_agree(runs):
    np.testing.assert_allclose(_losses(runs["fsdp"], 1, 10), _losses(runs["full"], 1, 10), rtol=2e-4)


def test_parameters_are_sharded_on_fsdp_mesh(runs):
    report = json.loads((runs["root"] / "fsdp" / "sharding.json").read_text())
    rows = {r["path"]: r for r in report["trainable"]}
    kernel = rows["['encoder']['conv']['kernel']"]  # (32, 1, 32): 1024 elements >= min_shard_size
    assert kernel["spec"][0] == "fsdp" and kernel["shard_shape"] == [8, 1, 32]
    bias = rows["['encoder']['conv']['bias']"]  # small: replicated
    assert bias["spec"] == [] and bias["shard_shape"] == bias["shape"]


def test_resume_reproduces_the_uninterrupted_run(runs):
    resumed = [r for r in runs["resumed"] if r["step"] > 10]
    assert [r["step"] for r in resumed] == list(range(11, 21))
    np.testing.assert_allclose(_losses(resumed, 11, 20), _losses(runs["full"], 11, 20), rtol=1e-6)


# ------------------------------------------------------------------------------------------ in process


def _toy_setup(accum: int = 1, batch: int = 4, samples: int = 1600):
    config = TrainConfig(optimizer=OptimizerConfig(learning_rate=1e-3, grad_accum=accum))
    task = toy_task()
    optimizer = make_optimizer(config.optimizer, lambda p: decay_mask(path_names(p), ("norm",)))
    schedule = make_schedule(ScheduleConfig(kind="constant", warmup_steps=0), 1e-3, 10, 0)
    wav = 0.1 * jax.random.normal(jax.random.key(1), (batch, samples))
    batch = {"wav": wav, "length": jnp.full((batch,), samples, jnp.int32)}
    state, frozen = init_train_state(task, optimizer, 0, batch)
    step = jax.jit(make_train_step(task, optimizer, schedule, config))
    return state, frozen, batch, step


def test_nan_batch_is_skipped_and_counted():
    state, frozen, batch, step = _toy_setup()
    bad = {**batch, "wav": batch["wav"].at[0, 5].set(jnp.nan)}
    before = jax.tree.map(np.asarray, (state.trainable, state.opt_state, state.extra))
    state, metrics = step(state, frozen, bad)
    after = jax.tree.map(np.asarray, (state.trainable, state.opt_state, state.extra))
    assert int(metrics["update_skipped"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, after)
    state, metrics = step(state, frozen, batch)
    assert int(metrics["update_skipped"]) == 0 and int(state.skipped) == 1
    assert np.isfinite(float(metrics["loss"]))


def test_gradient_accumulation_runs():
    state, frozen, batch, step = _toy_setup(accum=2)
    state, metrics = step(state, frozen, batch)
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["grad_norm"]))


def test_corrupt_audio_file_is_skipped(tmp_path, caplog):
    t = np.arange(14400) / 24000
    for i in range(3):
        sf.write(tmp_path / f"good{i}.wav", 0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t), 24000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    config = DataConfig(segment_seconds=0.5, global_batch_size=4, crop="start")
    with caplog.at_level(logging.WARNING):
        batch = next(iter(make_loader(tmp_path, config, seed=0, shuffle=False)))
    assert batch["wav"].shape == (4, 12000) and np.all(np.isfinite(batch["wav"]))
    assert np.all(batch["length"] == 12000)
    assert any("bad.wav" in r.getMessage() for r in caplog.records)


def test_cosine_schedule_matches_reference_formula():
    total, warmup = 1000, int(0.03 * 1000)
    lr = make_schedule(ScheduleConfig(), 1e-4, total, warmup)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(15)), 1e-4 * 15 / 30, rtol=1e-6)
    np.testing.assert_allclose(float(lr(30)), 1e-4, rtol=1e-6)
    c = 500
    np.testing.assert_allclose(float(lr(c)), 1e-4 * 0.5 * (1 + math.cos(math.pi * (c - 30) / 970)), rtol=1e-5)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-12)
    assert TrainConfig(steps=1000).warmup_steps(10) == 30


def test_decay_mask_excludes_norm_names():
    state, *_ = _toy_setup()
    mask = decay_mask(path_names(state.trainable), ("norm",))
    assert mask["encoder"]["post_norm"]["scale"] is False and mask["encoder"]["post_norm"]["bias"] is False
    assert mask["encoder"]["conv"]["kernel"] is True and mask["decoder"]["proj"]["bias"] is True


def test_leaf_spec_rule():
    assert leaf_spec((1024, 768), 4, 2**14) == jax.sharding.PartitionSpec("fsdp", None)
    assert leaf_spec((6, 768, 3072), 4, 2**14) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert leaf_spec((768,), 4, 2**14) == jax.sharding.PartitionSpec()  # small
    assert leaf_spec((999, 333), 4, 1) == jax.sharding.PartitionSpec()  # nothing divisible


def test_model_dir_roundtrip(tmp_path):
    variables = {"frozen": {"sq": {"w": np.arange(6.0).reshape(2, 3)}}, "trainable": {"b": np.ones(4)}}
    target = tmp_path / "model"
    save_model_dir(target, variables, "model: toy\n")
    loaded, config = load_model_dir(target)
    np.testing.assert_array_equal(loaded["frozen"]["sq"]["w"], variables["frozen"]["sq"]["w"])
    assert config == {"model": "toy"} and not (tmp_path / "model.tmp").exists()
    with pytest.raises(FileExistsError):
        save_model_dir(target, variables, "model: toy\n")
    save_model_dir(target, {"trainable": {"b": np.zeros(4)}}, "model: toy\n", force=True)
    assert np.all(load_model_dir(target)[0]["trainable"]["b"] == 0)
