"""The few-step student (almtok_jax/flow/shortcut.py, almtok_jax/train/distill.py): its objective, its
start (equal to the teacher), and the whole path at the tiny preset: ``train.py`` with
``configs/distill_tiny.yaml`` for two steps from the converted tiny release, ``--export``, then ``infer.py``
on the export decodes with the student's own sampler (shortcut, 2 steps, guidance baked)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
import yaml

from almtok_jax.config import load_model_config
from almtok_jax.flow.cfm import SamplerConfig, sample
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.flow.shortcut import flow_map_targets
from almtok_jax.tokenizer import ALMTokenizer2
from tests.conftest import AUDIO, REPO


def test_flow_map_targets_are_the_average_velocity_of_each_grid_step():
    n, b, frames, channels = 8, 3, 5, 2
    t_span = jnp.linspace(0.0, 1.0, n + 1)
    curve = jax.random.normal(jax.random.key(0), (n + 1, b, frames, channels))
    states = jnp.cumsum(curve, axis=0)  # any trajectory: the target is the chord of one step of the grid
    guided = jax.random.normal(jax.random.key(1), (n, b, frames, channels))
    for level in (1, 2, 4):
        x, t, step, target = flow_map_targets(states, t_span, guided, level, jax.random.key(level))
        k0 = np.rint(np.asarray(t) * n).astype(int)
        k1 = k0 + n // level
        np.testing.assert_allclose(step, 1.0 / level, rtol=1e-6)
        assert set(k0) <= set(range(0, n, n // level))
        np.testing.assert_allclose(x, states[k0, np.arange(b)])
        np.testing.assert_allclose(target, (states[k1, np.arange(b)] - states[k0, np.arange(b)]) * level, rtol=1e-5)
    x, t, step, target = flow_map_targets(states, t_span, guided, 0, jax.random.key(9))
    k = np.rint(np.asarray(t) * n).astype(int)
    np.testing.assert_array_equal(step, 0.0)
    np.testing.assert_allclose(target, guided[k, np.arange(b)])


def test_student_starts_as_the_teacher_and_one_shortcut_step_is_its_euler_step():
    dit = load_model_config(REPO / "configs" / "tiny_release.yaml").dit
    h = jax.random.normal(jax.random.key(0), (2, 6, dit.in_channels))
    t = jnp.array([0.0, 0.5])
    teacher = DiTEstimator(dit).init(jax.random.key(1), h, t)
    student_dit = dataclasses.replace(dit, step_embedding=True)
    student = DiTEstimator(student_dit).init(jax.random.key(2), h, t)
    embedder = student["params"]["adaln_single"]["step_embedder"]
    params = {**teacher["params"], "adaln_single": {**teacher["params"]["adaln_single"], "step_embedder": embedder}}
    student = {**teacher, "params": params}
    v_teacher = DiTEstimator(dit).apply(teacher, h, t)
    v_student = DiTEstimator(student_dit).apply(student, h, t, jnp.array([1.0, 0.25]))
    np.testing.assert_array_equal(v_student, v_teacher)

    # the shortcut solver feeds each step's size; with no step embedding the estimator refuses one
    cond = h[..., 2 * dit.out_channels:]
    x0, prompt = h[..., : dit.out_channels], jnp.zeros_like(h[..., : dit.out_channels])
    seen = []

    def velocity(hh, tt, step):
        seen.append(step)
        return DiTEstimator(dit).apply(teacher, hh, tt)

    shortcut = SamplerConfig(num_steps=2, solver="shortcut", guidance="baked")
    euler = SamplerConfig(num_steps=2, solver="euler", guidance_scale=1.0)
    x_short, _ = sample(velocity, cond, prompt, jnp.zeros((2,), jnp.int32), x0, shortcut)
    x_euler, _ = sample(lambda hh, tt: DiTEstimator(dit).apply(teacher, hh, tt), cond, prompt,
                        jnp.zeros((2,), jnp.int32), x0, euler)
    np.testing.assert_allclose(x_short, x_euler, rtol=1e-6, atol=1e-6)
    assert shortcut.passes == 2 and SamplerConfig(num_steps=2, solver="euler").passes == 4
    assert seen[0].shape == (2,)
    try:
        DiTEstimator(dit).apply(teacher, h, t, t)
    except ValueError as e:
        assert "step embedding" in str(e)
    else:
        raise AssertionError("a step size without a step embedding was accepted")


def test_distill_trains_exports_and_infer_decodes_with_the_student(tiny_checkpoint, tmp_path):
    import infer
    from almtok_jax.train import run

    export = tmp_path / "student"
    argv = ["--config", str(REPO / "configs" / "distill_tiny.yaml"), "--workdir", str(tmp_path / "run"),
            "--steps", "2", "--export", str(export), f"frozen_from={tiny_checkpoint}",
            f"trainable_init={tiny_checkpoint}", f"data.train={AUDIO / 'speech'}", "data.segment_seconds=1.0",
            "data.global_batch_size=2", "distill.levels=[0,1,2]", "distill.teacher_steps=2",
            "distill.teacher_solver=euler", "schedule.warmup_steps=0", "optimizer.learning_rate=1e-2",
            "logging.every=1"]
    run.main(argv)
    records = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[k]) for r in records for k in ("loss_step0", "loss_step1", "loss_step2"))

    config = yaml.safe_load((export / "config.yaml").read_text())
    assert config["sampler"]["solver"] == "shortcut" and config["sampler"]["guidance"] == "baked"
    assert config["sampler"]["num_steps"] == 2 and config["dit"]["step_embedding"] is True
    tok = ALMTokenizer2.load(export)
    embedder = tok.variables["flow"]["params"]["estimator"]["adaln_single"]["step_embedder"]["kernel"]
    assert np.abs(np.asarray(embedder)).max() > 0  # trained away from its zero start
    teacher = ALMTokenizer2.load(tiny_checkpoint)
    for name in teacher.variables:  # everything but the flow decoder is the teacher's, unchanged
        if name != "flow":
            jax.tree.map(np.testing.assert_array_equal, tok.variables[name], teacher.variables[name])

    clip = tmp_path / "clip.wav"
    wav, rate = sf.read(sorted((AUDIO / "speech").glob("*.wav"))[0], dtype="float32")
    sf.write(clip, wav[:rate], rate)
    assert infer.main(["--checkpoint", str(export), str(clip), "-o", str(tmp_path / "out")]) == 0
    out, sr = sf.read(tmp_path / "out" / "clip.wav")
    assert sr == 24000 and out.shape == (24000,) and np.all(np.isfinite(out)) and np.abs(out).max() > 0
