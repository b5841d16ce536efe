"""Training infrastructure, in process with the toy task: NaN skipping, gradient accumulation,
corrupt-file skipping, schedule, decay mask, sharding rule, model directories.

Convergence, mesh equivalence, FSDP placement and exact resume are tested with the real model in
``test_train.py`` (``train.py`` subprocesses on 8 simulated devices).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import soundfile as sf
from toy_task import toy_task

from almtok_jax.train.config import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from almtok_jax.train.data import ProcessRows, make_loader
from almtok_jax.train.sharding import leaf_spec
from almtok_jax.train.state import (
    Task,
    decay_mask,
    init_train_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    past_horizon_note,
    path_names,
)
from almtok_jax.train.task import build_task, is_task_reference
from almtok_jax.weights.model_dir import load_model_dir, save_model_dir

REPO = Path(__file__).resolve().parents[1]
AUDIO = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve() / "audio"


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


def test_process_rows_read_the_same_global_batches_for_any_process_count():
    base = grain.samplers.IndexSampler(num_records=10, shuffle=True, num_epochs=None, seed=3)
    whole = ProcessRows(base, 4, (0, 4))
    halves = [ProcessRows(base, 4, (0, 2)), ProcessRows(base, 4, (2, 4))]
    for b in range(6):  # crosses epochs (10 clips, 4 per batch)
        split = [halves[h][2 * b + r] for h in range(2) for r in range(2)]
        assert [(m.index, m.record_key) for m in split] == [(whole[4 * b + r].index, whole[4 * b + r].record_key)
                                                             for r in range(4)]
    resumed = ProcessRows(base, 4, (2, 4), first_batch=3)
    assert [resumed[i].index for i in range(4)] == [14, 15, 18, 19]
    assert len(ProcessRows(grain.samplers.IndexSampler(num_records=10, num_epochs=1), 4, (2, 4))) == 4


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


def test_learning_rate_stays_at_its_final_value_past_the_horizon():
    total, warmup = 100, 10
    lr = make_schedule(ScheduleConfig(end_lr_fraction=0.1), 1e-4, total, warmup)
    final = float(lr(total))
    np.testing.assert_allclose(final, 1e-5, rtol=1e-5)
    assert float(lr(total - 1)) > final
    assert [float(lr(c)) for c in (total + 1, 150, 190, 10_000)] == [final] * 4  # the half cosine would re-rise
    assert past_horizon_note(total, total, lr) is None
    note = past_horizon_note(150, total, lr)
    assert "step 150" in note and "horizon of 100" in note and "1e-05" in note


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
    assert config == {"model": "toy"} and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(FileExistsError):
        save_model_dir(target, variables, "model: toy\n")
    save_model_dir(target, {"trainable": {"b": np.zeros(4)}}, "model: toy\n", force=True)
    assert np.all(load_model_dir(target)[0]["trainable"]["b"] == 0)


def _regression_task() -> Task:
    """A loss that is a mean of per-row terms (``mean_b |x_b w - y_b|^2``), no extra state, rng unused."""
    def init_fn(rng, batch):
        return {"w": jax.random.normal(rng, (batch["wav"].shape[1], 3))}, {}, {}

    def loss_fn(trainable, frozen, extra, batch, rng):
        target = jnp.stack([batch["wav"].sum(1), batch["wav"][:, 0], jnp.cos(batch["wav"][:, 1])], axis=1)
        err = jnp.mean(jnp.square(batch["wav"] @ trainable["w"] - target), axis=1)
        return jnp.mean(err), ({"loss_fit": jnp.mean(err)}, extra)

    return Task(init_fn=init_fn, loss_fn=loss_fn)


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_full_batch_step(accum):
    """With a per-row mean loss, ``grad_accum`` micro-batches (gradients and metrics averaged) give the
    same update as one step on the whole batch. The comparison uses plain SGD (``optax.identity``, no clip)
    so the new weights are ``w - lr * grad`` and any gradient difference shows. Losses normalised over the
    whole batch (the toy's reconstruction MSE over mean power, the flow loss's sum of weights) or extra
    state updated per micro-batch (EMA codebooks) are not batch-size invariant, so for them accumulation
    is an average of micro-batch steps, not the full-batch step."""
    task = _regression_task()
    wav = jax.random.normal(jax.random.key(3), (8, 5))
    batch = {"wav": wav, "length": jnp.full((8,), 5, jnp.int32)}
    schedule = make_schedule(ScheduleConfig(kind="constant", warmup_steps=0), 0.1, 10, 0)

    def one_step(grad_accum: int):
        config = TrainConfig(optimizer=OptimizerConfig(learning_rate=0.1, grad_accum=grad_accum, clip_norm=0.0))
        state, frozen = init_train_state(task, optax.identity(), 0, batch)
        return state, jax.jit(make_train_step(task, optax.identity(), schedule, config))(state, frozen, batch)

    start, (full, full_metrics) = one_step(1)
    _, (accumulated, acc_metrics) = one_step(accum)
    # The expected gradient from its closed form, independent of the step: d/dw mean_b mean_o (x_b w - y)^2.
    x, w = np.asarray(wav, np.float64), np.asarray(start.trainable["w"], np.float64)
    y = np.stack([x.sum(1), x[:, 0], np.cos(x[:, 1])], axis=1)
    grad = 2 * x.T @ (x @ w - y) / (x.shape[0] * y.shape[1])
    np.testing.assert_allclose(np.asarray(full.trainable["w"]), w - 0.1 * grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(accumulated.trainable["w"]), np.asarray(full.trainable["w"]),
                               rtol=1e-6, atol=1e-6)
    for key in ("loss", "loss_fit", "grad_norm"):
        np.testing.assert_allclose(float(acc_metrics[key]), float(full_metrics[key]), rtol=1e-6)
    assert set(full_metrics) >= {"loss", "loss_fit", "grad_norm", "lr", "skipped"}
    assert not {"loss_flow", "loss_commit", "loss_phone"} & set(full_metrics)  # no names of another task


def test_build_task_takes_a_task_or_a_factory_name():
    task = _regression_task()
    assert build_task(task, TrainConfig()) is task
    assert is_task_reference("tests.toy_task:toy_task") and not is_task_reference("configs/tiny_release.yaml")
    assert isinstance(build_task("toy_task:toy_task", TrainConfig()), Task)
