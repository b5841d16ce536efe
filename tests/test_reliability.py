"""Bad inputs, collisions, kills and broken files through the user-facing commands (issue 17).

Everything runs in process through each command's ``main(argv)``: ``infer.py`` and ``convert_torch_weights.py``
on the tiny release model (converted once for the module), ``train.py`` on the toy task for one or two steps,
``evaluate`` in its references-only mode. Decoding uses one sampler step.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, FIXTURES, REPO

import convert_torch_weights
import infer
import train
from almtok_jax.audio import AudioError, load_audio
from almtok_jax.cli import evaluate
from almtok_jax.mapping import MappingError, Rule, convert_state_dict
from almtok_jax.tokenizer import ALMTokenizer2
from almtok_jax.weights import model_dir as ckpt_lib

RELEASE = FIXTURES / "release_tiny"
TINY = REPO / "configs" / "tiny_release.yaml"
TOY = REPO / "configs" / "train_toy.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    assert convert_torch_weights.main(["--release", str(RELEASE), "--config", str(TINY), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    """Valid (8, T) codes of the tiny model (64 codes per codebook)."""
    return np.load(RELEASE / "expected.npz")["out/codes_speech48k"][0]


def write_clip(path: Path, seconds: float = 0.2, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).standard_normal(int(24000 * seconds)).astype(np.float32)
    sf.write(path, 0.1 * noise, 24000)
    return path


def run_infer(model: Path, *args: str) -> int:
    return infer.main(["--checkpoint", str(model), "--steps", "1", *args])


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1, 10, 11, 12: train.py


def run_train(workdir: Path, steps: int, *args: str) -> None:
    train.main(["--config", str(TOY), "--workdir", str(workdir), "--steps", str(steps),
                f"data.train={AUDIO / 'speech'}", "checkpoint.every=1", "checkpoint.keep=5", *args])


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def metric_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A toy run of 2 steps with a checkpoint after each."""
    workdir = tmp_path_factory.mktemp("train") / "run"
    run_train(workdir, 2)
    assert checkpoint_steps(workdir) == [1, 2] and metric_steps(workdir) == [1, 2]
    return workdir


def copy_run(run: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    return workdir


def test_train_refuses_to_start_over_an_existing_run(two_step_run, tmp_path):
    workdir = copy_run(two_step_run, tmp_path)
    before = tree_bytes(workdir / "checkpoints"), (workdir / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as refused:
        run_train(workdir, 1)
    message = str(refused.value.code)
    assert str(workdir) in message and "--resume" in message and "--overwrite" in message
    assert "step 2" in message
    assert (tree_bytes(workdir / "checkpoints"), (workdir / "metrics.jsonl").read_text()) == before
    run_train(workdir, 1, "--overwrite")
    assert metric_steps(workdir) == [1]
    assert checkpoint_steps(workdir) == [1]


def test_resume_drops_the_metrics_of_the_steps_it_repeats(two_step_run, tmp_path):
    workdir = copy_run(two_step_run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "2")  # killed before the step-2 checkpoint landed
    run_train(workdir, 2, "--resume")
    assert metric_steps(workdir) == [1, 2]


def test_resume_falls_back_from_an_unreadable_newest_checkpoint(two_step_run, tmp_path, capsys):
    workdir = copy_run(two_step_run, tmp_path)
    data = sorted((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    for f in data:
        f.unlink()
    run_train(workdir, 3, "--resume")
    err = capsys.readouterr().err
    assert "checkpoint 2" in err and "cannot be read" in err and "falling back to step 1" in err
    assert "resumed from step 1" in err
    assert metric_steps(workdir) == [1, 2, 3]
    assert (workdir / "checkpoints.unreadable" / "2").is_dir()


def test_resume_past_the_target_step_says_so(two_step_run, tmp_path, capsys):
    workdir = copy_run(two_step_run, tmp_path)
    run_train(workdir, 1, "--resume")
    assert "target step 1 is already reached (the run is at step 2)" in capsys.readouterr().err
    assert metric_steps(workdir) == [1, 2]


@pytest.mark.parametrize(("override", "named"), [("optimizer.no_such_key=1", "no_such_key"),
                                                  ("data.train=/no/such/folder", "/no/such/folder"),
                                                  ("mesh.data=3", "mesh data=3")])
def test_train_user_errors_are_one_line(tmp_path, override, named):
    with pytest.raises(SystemExit) as refused:
        run_train(tmp_path / "run", 1, override)
    assert str(refused.value.code).startswith("error: ") and named in str(refused.value.code)


# ------------------------------------------------------------------------------ 2, 5, 11, 12: infer.py


def test_outputs_that_collide_are_refused_before_any_work(model, tmp_path, capsys):
    write_clip(tmp_path / "in" / "x.wav")
    write_clip(tmp_path / "in" / "x.flac")
    assert run_infer(model, str(tmp_path / "in"), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "x.wav" in err and "x.flac" in err and str(tmp_path / "out" / "x") in err
    assert not (tmp_path / "out").exists()

    write_clip(tmp_path / "a" / "y.wav")
    write_clip(tmp_path / "b" / "y.wav", seed=1)
    assert run_infer(model, str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "a" / "y.wav") in err and str(tmp_path / "b" / "y.wav") in err


def test_output_folder_equal_to_the_input_folder_is_refused(model, tmp_path, capsys):
    inp = tmp_path / "in"
    write_clip(inp / "x.wav")
    before = tree_bytes(inp)
    assert run_infer(model, str(inp), "-o", str(inp)) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert tree_bytes(inp) == before


def test_outputs_mirror_the_input_tree(model, tmp_path):
    inp = tmp_path / "in"
    write_clip(inp / "x.wav")
    write_clip(inp / "sub" / "x.wav", seed=1)
    assert run_infer(model, str(inp), "-o", str(tmp_path / "out"), "--encode-only") == 0
    out = tmp_path / "out"
    assert sorted(tree_bytes(out)) == ["sub/x.codes.npy", "x.codes.npy"]
    assert not np.array_equal(np.load(out / "x.codes.npy"), np.load(out / "sub" / "x.codes.npy"))


def test_unusable_output_folder_is_refused_before_loading_the_model(tmp_path, capsys):
    clip = write_clip(tmp_path / "x.wav")
    (tmp_path / "file").write_text("not a folder")
    no_model = tmp_path / "no_model"  # never opened: the output check comes first
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert infer.main(["--checkpoint", str(no_model), str(clip), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "no_model" not in err


def test_a_failed_save_fails_that_file_only(model, tmp_path, capsys):
    inp = tmp_path / "in"
    write_clip(inp / "x.wav")
    write_clip(inp / "y.wav", seed=1)
    (tmp_path / "out" / "x.wav").mkdir(parents=True)  # x's output path is taken by a folder
    (tmp_path / "out" / "x.wav" / "keep").write_text("")
    assert run_infer(model, str(inp), "-o", str(tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert f"cannot write {tmp_path / 'out' / 'x.wav'}" in captured.err
    assert "1 done, 1 failed" in captured.out
    assert sf.info(str(tmp_path / "out" / "y.wav")).frames == 4800


def test_nothing_to_do_is_an_error(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_infer(model, str(tmp_path / "empty"), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no input files" in err and str(tmp_path / "empty") in err


def test_missing_input_and_pipe_are_reported_and_skipped(model, tmp_path, capsys):
    inp = tmp_path / "in"
    write_clip(inp / "x.wav")
    os.mkfifo(inp / "pipe.wav")
    # a writer that unblocks a reader stuck on the pipe, so that a regression fails instead of hanging
    unblock = threading.Timer(60, lambda: os.close(os.open(inp / "pipe.wav", os.O_WRONLY)))
    unblock.daemon = True
    unblock.start()
    try:
        rc = run_infer(model, str(inp), str(tmp_path / "missing.wav"), "-o", str(tmp_path / "out"), "--encode-only")
    finally:
        unblock.cancel()
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing.wav'}: no such file" in err
    assert f"{inp / 'pipe.wav'}: not a regular file" in err
    assert (tmp_path / "out" / "x.codes.npy").is_file()
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(inp / "pipe.wav")


# ------------------------------------------------------------------------------- 3, 12: infer.py --decode


@pytest.mark.parametrize(("name", "shift", "shown"), [("negative", -100, "from -"),
                                                       ("too_large", 64, "to 1"),
                                                       ("wrapping", 2**40, "to 1099511627")])
def test_decode_refuses_codes_out_of_range(model, codes, tmp_path, capsys, name, shift, shown):
    bad = codes.astype(np.int64) + shift
    np.save(tmp_path / f"{name}.npy", bad)
    assert run_infer(model, "--decode", str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / f"{name}.npy") in err and "[0, 64)" in err and shown in err
    assert not list((tmp_path / "out").iterdir())


def test_tokenizer_decode_uses_the_same_check(model, codes):
    tok = ALMTokenizer2.load(model)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\), got values from 1099511627776 to 1099511627"):
        tok.decode(codes.astype(np.int64) + 2**40, steps=1)


def test_a_text_file_named_npy_is_not_called_a_pickle(model, tmp_path, capsys):
    (tmp_path / "notes.npy").write_text("these are not codes\n")
    assert run_infer(model, "--decode", str(tmp_path / "notes.npy"), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.npy'} is not a NumPy array file" in err and "pickle" not in err


# ---------------------------------------------------------------------------------- 10: model directories


def _damage_weights(model: Path) -> None:
    """Delete the largest file of the weights: a chunk of data, whatever the storage layout."""
    data = max((p for p in (model / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.unlink()


def _garble_config(model: Path) -> None:
    (model / "config.yaml").write_text("quantizer: [unclosed\n  rvq: {")


def _delete_config(model: Path) -> None:
    (model / "config.yaml").unlink()


@pytest.mark.parametrize(("damage", "named"), [(_damage_weights, "the weights in params/ cannot be read"),
                                                (_garble_config, "config.yaml is not readable YAML"),
                                                (_delete_config, "config.yaml missing")])
def test_broken_model_directory_is_one_line(model, tmp_path, capfd, damage, named):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    damage(broken)
    assert run_infer(broken, str(write_clip(tmp_path / "x.wav")), "-o", str(tmp_path / "out")) == 2
    time.sleep(1)  # reads still in flight report late
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and str(broken) in lines[0] and named in lines[0]


# ------------------------------------------------------------------------------------------- 9: convert


def test_force_refuses_a_folder_that_is_not_a_model_directory(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    rc = convert_torch_weights.main(["--release", str(RELEASE), "--config", str(TINY), "--out", str(notes),
                                     "--force"])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(notes) in err and "not a model directory" in err
    assert (notes / "thesis.tex").read_text() == "years of work"


class Killed(BaseException):
    """A kill -9 at one file-system operation (BaseException: no handler may catch it)."""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_force_replacement_leaves_a_complete_model_at_every_kill(tmp_path, monkeypatch, kill_at):
    """Kill the replacement at the n-th rename / delete of the model folders (a delete cut halfway): a
    complete model must remain (the old or the new one), and the next --force run must finish the job."""
    target = tmp_path / "model"
    real_replace, real_rmtree = os.rename, shutil.rmtree
    calls = []

    def fault(path: object) -> None:
        name = Path(path).name
        if name == target.name or name.startswith(f".{target.name}.almtok-"):
            calls.append(path)
            if len(calls) == kill_at:
                raise Killed

    def replace(src, dst):
        fault(src)
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        try:
            fault(path)
        except Killed:
            (Path(path) / "config.yaml").unlink()  # the delete got that far
            raise
        real_rmtree(path, *args, **kwargs)

    def value(directory: Path) -> float | None:
        try:
            return float(ckpt_lib.load_model_dir(directory)[0]["trainable"]["b"][0])
        except (ValueError, FileNotFoundError):  # not a complete model directory
            return None

    ckpt_lib.save_model_dir(target, {"trainable": {"b": np.zeros(4)}}, "model: toy\n")
    new = {"trainable": {"b": np.ones(4)}}
    monkeypatch.setattr(os, "rename", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        ckpt_lib.save_model_dir(target, new, "model: toy\n", force=True)
    monkeypatch.undo()
    asides = list(tmp_path.glob(".model.almtok-replaced-*"))
    assert value(target) in (0.0, 1.0) or (not target.exists() and [value(a) for a in asides] == [0.0])
    ckpt_lib.save_model_dir(target, new, "model: toy\n", force=True)
    assert value(target) == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------- 4, 11, 12: evaluate


def test_a_plot_failure_is_a_note_and_the_results_are_written(tmp_path):
    ref, deg = tmp_path / "ref", tmp_path / "deg"
    for folder in (ref, deg):
        folder.mkdir()
        shutil.copy(AUDIO / "speech" / "p225_001.wav", folder)
        write_clip(folder / "a_short.wav", seconds=400 / 24000)  # 400 samples: too short for the plot's STFT
    summary = evaluate.main(["--references-only", str(ref), str(deg), "-o", str(tmp_path / "out"), "--plots", "2"])
    assert (tmp_path / "out" / "metrics.csv").is_file() and (tmp_path / "out" / "summary.json").is_file()
    assert list(summary["plot_failures"]) == ["a_short"]
    assert summary["metrics"]["si_sdr"]["count"] == 1  # the short clip is too short for the metrics too
    assert [p.name for p in (tmp_path / "out" / "plots").iterdir()] == ["p225_001.png"]


@pytest.mark.parametrize("case", ["no_matches", "all_silent"])
def test_evaluate_with_nothing_scored_exits_non_zero(tmp_path, case):
    ref, deg = tmp_path / "ref", tmp_path / "deg"
    ref.mkdir()
    deg.mkdir()
    shutil.copy(AUDIO / "speech" / "p225_001.wav", ref)
    if case == "no_matches":
        shutil.copy(AUDIO / "speech" / "p225_001.wav", deg / "other.wav")
    else:
        sf.write(deg / "p225_001.wav", np.zeros(24000), 24000)
    with pytest.raises(SystemExit) as failed:
        evaluate.main(["--references-only", str(ref), str(deg), "-o", str(tmp_path / "out"), "--plots", "0"])
    assert "no clip could be scored" in str(failed.value.code)
    assert (tmp_path / "out" / "metrics.csv").is_file() and (tmp_path / "out" / "summary.json").is_file()


def test_evaluate_names_the_missing_references_only_folder(tmp_path):
    (tmp_path / "deg").mkdir()
    with pytest.raises(SystemExit) as failed:
        evaluate.main(["--references-only", str(tmp_path / "ref"), str(tmp_path / "deg"), "-o", str(tmp_path / "o")])
    message = str(failed.value.code)
    assert f"--references-only REF_DIR {tmp_path / 'ref'}: no such folder" in message and "--data" not in message


# ------------------------------------------------------------------------------------------ 12: mapping


def test_a_mis_shaped_stacked_layer_is_named_with_its_index():
    rules = [Rule(r"layers\.(?P<i>\d+)\.w", "params/layers/w", stack="i")]
    state = {f"layers.{i}.w": np.zeros((4, 6) if i == 1 else (4, 5)) for i in range(3)}
    expected = {"params": {"layers": {"w": jax.ShapeDtypeStruct((3, 4, 5), np.float32)}}}
    with pytest.raises(MappingError) as err:
        convert_state_dict(state, rules, expected, source="ckpt.pt")
    message = str(err.value)
    assert "params/layers/w: layer 1 (layers.1.w) gives (4, 6), model expects (4, 5) per layer" in message
    assert "missing" not in message
    with pytest.raises(MappingError, match=r"layer 1 \(layers.1.w\) gives \(4, 6\), the other layers give \(4, 5\)"):
        convert_state_dict(state, rules, source="ckpt.pt")


def test_evaluate_with_a_broken_model_directory_is_one_line(model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    _garble_config(broken)
    with pytest.raises(SystemExit) as failed:
        evaluate.main(["--checkpoint", str(broken), "--data", str(AUDIO / "speech" / "p225_001.wav"), "-o",
                       str(tmp_path / "out")])
    assert str(failed.value.code).startswith(f"error: {broken / 'config.yaml'} is not readable YAML (line 2, column 6)")
