"""The real ALMTokenizer2 training task (almtok_jax/train/task.py) at the tiny preset, on 1 s clips.

``train.py`` subprocesses on 8 simulated CPU devices: a 50-step run on a 1x8 data mesh (checkpoints at
steps 25 and 50, export at the end), a 3-step run on a 2x4 data x fsdp mesh, and a restart from the
step-25 checkpoint. The export then reconstructs a clip through ``infer.py``. A few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from almtok_jax.config import load_model_config
from almtok_jax.flow.dit import sinusoidal_table
from almtok_jax.model import FROZEN, init_variables
from almtok_jax.tokenizer import ALMTokenizer2
from almtok_jax.train.state import decay_mask, path_names
from almtok_jax.train.task import task_trees

REPO = Path(__file__).resolve().parents[1]
AUDIO = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve() / "audio"
CONFIG = REPO / "configs" / "train_tiny.yaml"
MODEL = REPO / "configs" / "tiny_release.yaml"
STEPS = 50  # the run length; the schedule horizon is the config's 50 steps in every run below
RESUME_AT = 25  # a checkpoint of the 50-step run; the restart continues 3 steps from it


def _start(workdir: Path, steps: int, *args: str, resume: bool = False) -> tuple[Path, subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(CONFIG), "--workdir", str(workdir),
           "--steps", str(steps), *(["--resume"] if resume else []), *args]
    return workdir, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)


def _finish(run: tuple[Path, subprocess.Popen]) -> list[dict]:
    workdir, proc = run
    output, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, output[-4000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_real")
    clips = f"data.train={AUDIO / 'speech'}"
    full = _start(root / "full", STEPS, clips, "mesh.data=8", "mesh.fsdp=1", f"checkpoint.every={RESUME_AT}",
                  "--export", str(root / "export"))
    fsdp = _start(root / "fsdp", 3, clips, "mesh.data=2", "mesh.fsdp=4")
    results = {"full": _finish(full), "root": root}
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "full" / "checkpoints" / str(RESUME_AT), root / "resumed" / "checkpoints" / str(RESUME_AT))
    resumed = _start(root / "resumed", RESUME_AT + 3, clips, "mesh.data=8", "mesh.fsdp=1",
                     f"checkpoint.every={RESUME_AT}", resume=True)
    results["fsdp"] = _finish(fsdp)
    results["resumed"] = _finish(resumed)
    return results


def _column(records: list[dict], key: str, first: int, last: int) -> np.ndarray:
    by_step = {r["step"]: r[key] for r in records if "split" not in r}
    return np.array([by_step[s] for s in range(first, last + 1)])


def test_loss_terms_are_logged_finite_and_go_down(runs):
    records = runs["full"]
    for key in ("loss", "loss_flow", "loss_commit", "loss_phone", "grad_norm"):
        values = _column(records, key, 1, STEPS)
        assert np.all(np.isfinite(values)), (key, values)
    assert records[-1]["skipped"] == 0
    # mean of the last 5 steps against the first 5 (measured: loss 9.1 -> 1.2, flow 1.43 -> 1.11, phone 8.5 -> 0.2)
    for key, factor in (("loss", 0.5), ("loss_flow", 0.9), ("loss_phone", 0.5)):
        values = _column(records, key, 1, STEPS)
        assert values[-5:].mean() < factor * values[:5].mean(), (key, values)


def test_data_and_fsdp_meshes_agree(runs):
    for key in ("loss", "loss_flow", "loss_commit", "loss_phone"):
        np.testing.assert_allclose(_column(runs["fsdp"], key, 1, 3), _column(runs["full"], key, 1, 3),
                                   rtol=2e-3, atol=1e-5, err_msg=key)


def test_parameters_are_sharded_on_fsdp_mesh(runs):
    report = json.loads((runs["root"] / "fsdp" / "sharding.json").read_text())
    rows = {r["path"]: r for r in report["trainable"]}
    kernel = rows["['flow']['params']['estimator']['transformer_blocks']['ff']['net_0']['kernel']"]
    assert kernel["shape"] == [2, 128, 512] and "fsdp" in kernel["spec"]
    assert np.prod(kernel["shard_shape"]) * 4 == np.prod(kernel["shape"])
    sharded = sum("fsdp" in r["spec"] for r in report["trainable"])
    assert sharded >= 10, sharded


def test_resume_reproduces_the_uninterrupted_run(runs):
    resumed = [r for r in runs["resumed"] if r["step"] > RESUME_AT and "split" not in r]
    assert [r["step"] for r in resumed] == [RESUME_AT + 1, RESUME_AT + 2, RESUME_AT + 3]
    for key in ("loss", "loss_flow", "loss_commit", "loss_phone"):
        np.testing.assert_allclose(_column(resumed, key, RESUME_AT + 1, RESUME_AT + 3),
                                   _column(runs["full"], key, RESUME_AT + 1, RESUME_AT + 3), rtol=1e-5, err_msg=key)


def test_export_reconstructs_a_clip_with_infer(runs, tmp_path):
    import infer

    clip = tmp_path / "clip.wav"
    wav, rate = sf.read(sorted((AUDIO / "speech").glob("*.wav"))[0], dtype="float32")
    sf.write(clip, wav[:rate], rate)  # 1 s
    assert infer.main(["--checkpoint", str(runs["root"] / "export"), str(clip), "-o", str(tmp_path / "out"),
                       "--steps", "2"]) == 0
    codes = np.load(tmp_path / "out" / "clip.codes.npy")
    assert codes.shape == (8, 24000 // 1920 + 1) and codes.min() >= 0
    out, sr = sf.read(tmp_path / "out" / "clip.wav")
    assert sr == 24000 and out.shape == (24000,) and np.all(np.isfinite(out))


def test_export_loads_with_tokenizer_load(runs):
    tok = ALMTokenizer2.load(runs["root"] / "export")
    assert "codebook" in tok.variables["quantizer"] and "buffers" in tok.variables["flow"]


# ------------------------------------------------------------------------------------------ in process


def test_task_trees_layout_and_decay_rule():
    config = load_model_config(MODEL)
    variables = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    trainable, frozen, extra = task_trees(variables)
    assert set(frozen) == set(FROZEN) and set(trainable) == {"fusion", "quantizer", "flow"}
    assert all(set(t) == {"params"} for t in trainable.values())
    assert set(extra) == {"quantizer", "flow"} and set(extra["quantizer"]) == {"codebook"}
    mask = jax.tree_util.tree_flatten_with_path(decay_mask(path_names(trainable), ("norm",)))[0]
    no_decay = {jax.tree_util.keystr(p) for p, decayed in mask if not decayed}
    assert no_decay and all("q_norm" in n or "k_norm" in n for n in no_decay), no_decay
    buffers = jax.jit(lambda k: init_variables(config, k)["flow"]["buffers"])(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(buffers["estimator"]["pos_embed"]["pe"]),
                                  sinusoidal_table(config.dit.num_positional_embeddings, config.dit.inner_dim))


def test_gpt_loss_switch_adds_a_trained_predictor():
    """``quantizer.gpt_loss.enabled`` adds the next-code loss and a ``gpt`` trainable component (traced only)."""
    from dataclasses import replace

    from almtok_jax.train.task import training_loss

    base = load_model_config(MODEL)
    gpt = replace(base.quantizer.gpt_loss, enabled=True, layers=1, heads=2, width=32, max_len=64)
    config = replace(base, quantizer=replace(base.quantizer, gpt_loss=gpt))
    variables = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    trainable, frozen, extra = task_trees(variables)
    assert "gpt" in trainable
    batch = {"wav": jax.ShapeDtypeStruct((2, 24240), np.float32), "length": jax.ShapeDtypeStruct((2,), np.int32)}

    def value_and_grad(t, f, e, b):
        return jax.value_and_grad(training_loss, has_aux=True)(t, f, e, b, jax.random.key(1), config)

    (value, (metrics, _)), grads = jax.eval_shape(value_and_grad, trainable, frozen, extra, batch)
    assert "loss_gpt" in metrics and value.shape == ()
    assert set(grads) == set(trainable)
