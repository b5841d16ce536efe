"""The second fault and bad-input sweep (issue 28): each test names its item number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from almtok_jax.weights import model_dir as ckpt_lib

TOY_YAML = "model: toy\n"


def _value(directory: Path) -> float:
    return float(ckpt_lib.load_model_dir(directory)[0]["trainable"]["b"][0])


# ------------------------------------------------------------------ 1, 2, 3: only our own temporary folders


def test_1_a_user_folder_named_like_the_old_temporary_is_kept(tmp_path):
    target = tmp_path / "model"
    user = tmp_path / "model.tmp"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    ckpt_lib.save_model_dir(target, {"trainable": {"b": np.ones(4)}}, TOY_YAML)
    assert (user / "thesis.tex").read_text() == "years of work" and _value(target) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp"]


def test_2_a_user_folder_named_like_the_old_aside_is_kept(tmp_path):
    target = tmp_path / "model"
    user = tmp_path / "model.replaced"
    ckpt_lib.save_model_dir(user, {"trainable": {"b": np.zeros(4)}}, TOY_YAML)  # even a model directory
    (user / "notes.txt").write_text("mine")
    ckpt_lib.save_model_dir(target, {"trainable": {"b": np.ones(4)}}, TOY_YAML)  # no "crash recovery"
    assert _value(target) == 1.0 and (user / "notes.txt").read_text() == "mine"
    ckpt_lib.save_model_dir(target, {"trainable": {"b": np.full(4, 2.0)}}, TOY_YAML, force=True)
    assert _value(target) == 2.0 and _value(user) == 0.0 and (user / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.replaced"]


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from almtok_jax.weights.model_dir import save_model_dir
    target, go, value, force = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    variables = {"trainable": {f"v{i:03d}": np.full(20000, value, np.float32) for i in range(150)}}
    Path(f"{go}.ready{value}").touch()
    while not go.exists():
        time.sleep(0.01)
    try:
        save_model_dir(target, variables, "model: toy\\n", force=force)
    except FileExistsError as e:
        print(f"refused: {e}")
        sys.exit(1)
    print("wrote")
""")


@pytest.mark.parametrize("force", [False, True])
def test_3_two_saves_into_one_folder_at_once_leave_a_complete_model(tmp_path, force):
    target, go = tmp_path / "model", tmp_path / "go"
    if force:
        ckpt_lib.save_model_dir(target, {"trainable": {"b": np.zeros(4)}}, TOY_YAML)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(go), str(v), str(int(force))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for v in (1.0, 2.0)]
    while not all(Path(f"{go}.ready{v}").exists() for v in (1.0, 2.0)):  # both imported and waiting
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outputs
    variables, _ = ckpt_lib.load_model_dir(target)
    values = {float(np.unique(v)[0]) for v in variables["trainable"].values()}
    assert len(variables["trainable"]) == 150 and len(values) == 1, outputs  # complete, and one model
    winners = [v for v, c in zip((1.0, 2.0), codes, strict=True) if c == 0]
    assert values.pop() in winners
    if not force:
        assert sorted(codes) == [0, 1], outputs  # the other one says why
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("go")) == ["model"]


# ---------------------------------------------------------------------- 4, 9, 12, 16: tokenize reruns


TOKENIZE_RUN = ["--shard-size", "1", "--batch-segments", "4", "--workers", "1", "--quiet"]


def _clip(path: Path, seconds: float = 0.3, seed: int = 0, rate: int = 24000) -> Path:
    import soundfile as sf

    noise = np.random.default_rng(seed).standard_normal(int(rate * seconds)).astype(np.float32)
    sf.write(path, 0.1 * noise, rate)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for k in range(2):
        _clip(folder / f"{k}.wav", seed=k)
    return folder


def _tokenize(checkpoint: Path, data: Path, out: Path, *extra: str) -> int:
    from almtok_jax.cli import tokenize

    return tokenize.main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                          *TOKENIZE_RUN, *extra])


@pytest.fixture(scope="module")
def tokenized(tiny_checkpoint, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenized") / "out"
    assert _tokenize(tiny_checkpoint, corpus, out) == 0
    return out


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def test_4_a_rerun_with_another_model_at_the_same_path_is_refused(tiny_checkpoint, corpus, tokenized, tmp_path,
                                                                 capsys):
    import shutil

    model, out = tmp_path / "model", tmp_path / "out"
    variables, config = ckpt_lib.load_model_dir(tiny_checkpoint)
    variables["trainable"] = {k: v for k, v in variables["trainable"].items()}
    import jax

    variables = jax.tree.map(lambda x: x * np.asarray(1.5, x.dtype) if x.dtype.kind == "f" else x, variables)
    ckpt_lib.save_model_dir(model, variables, (tiny_checkpoint / "config.yaml").read_text())
    shutil.copytree(tokenized, out)  # written with the tiny model, then re-converted under another path ...
    (out / "shard-00001-of-00002.json").unlink()  # ... and a crash before the second shard was complete
    shutil.rmtree(model)
    shutil.copytree(tiny_checkpoint, model)
    assert _tokenize(model, corpus, out) == 0  # the same model at another path: its shards are reused
    assert _shards(out) == _shards(tokenized)
    (out / "shard-00001-of-00002.json").unlink()
    ckpt_lib.save_model_dir(model, variables, (tiny_checkpoint / "config.yaml").read_text(), force=True)
    capsys.readouterr()
    assert _tokenize(model, corpus, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-00000-of-00002.json" in err[0] and "another model" in err[0], err


def test_9_every_list_line_is_encoded_or_reported(tiny_checkpoint, corpus, tmp_path):
    listing = tmp_path / "list.tsv"
    good, other = corpus / "0.wav", corpus / "1.wav"
    listing.write_text(f"# name\tpath\tduration\trate\n\na\t{good}\t0.3\t24000\nb {other} 0.3 24000\n"
                       f"c\t{other}\t0.3\n" f"d\t{other}\tlong\t24000\n")
    out = tmp_path / "out"
    assert _tokenize(tiny_checkpoint, listing, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["encoded"], summary["failed"]) == (4, 1, 3)
    reasons = [f["reason"] for f in summary["failures"]]
    assert [f"{listing}:{n}" in r for r, n in zip(reasons, (4, 5, 6), strict=True)] == [True] * 3, reasons
    assert "4 tab-separated" in reasons[0] and "'long'" in reasons[2]


@pytest.mark.parametrize("damage", ["truncate", "empty_json", "invalid_json"])
def test_12_a_broken_shard_is_redone(tiny_checkpoint, corpus, tokenized, tmp_path, damage):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tokenized, out)
    data, meta = out / "shard-00001-of-00002.array_record", out / "shard-00001-of-00002.json"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        meta.write_text("" if damage == "empty_json" else "{not json")
    assert _tokenize(tiny_checkpoint, corpus, out) == 0
    assert _shards(out) == _shards(tokenized)


def _one_line_error(capsys, rc: int, *named: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(err) == 1 and all(n in err[0] for n in named), err


def test_16_tokenize_usage_errors_are_one_line(tiny_checkpoint, corpus, tokenized, tmp_path, capsys):
    import shutil

    _one_line_error(capsys, _tokenize(tiny_checkpoint, corpus, tmp_path / "a", "--shard-size", "0"), "--shard-size 0")
    _one_line_error(capsys, _tokenize(tiny_checkpoint, tmp_path / "nothing", tmp_path / "b"), "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    _one_line_error(capsys, _tokenize(broken, corpus, tmp_path / "c"), str(broken))
    assert not (tmp_path / "c").exists()
    out = tmp_path / "d"
    shutil.copytree(tokenized, out)
    (out / "shard-00001-of-00002.json").unlink()
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    shutil.copy(corpus / "0.wav", fewer / "0.wav")
    shutil.copy(corpus / "1.wav", fewer / "2.wav")
    _one_line_error(capsys, _tokenize(tiny_checkpoint, fewer, out), "shard-00000-of-00002.json", "--out")


# ------------------------------------------------------------------------------ 5: non-finite weights


def _poisoned_release(folder: Path) -> Path:
    """The tiny release with NaN as the first value of its largest tensor."""
    import shutil
    import zipfile

    from conftest import FIXTURES

    shutil.copytree(FIXTURES / "release_tiny", folder)
    checkpoint = folder / "ep5.checkpoint"
    checkpoint.chmod(0o644)
    with zipfile.ZipFile(checkpoint) as zf:
        records = {info.filename: zf.read(info) for info in zf.infolist()}
    largest = max((n for n in records if "/data/" in n), key=lambda n: len(records[n]))
    records[largest] = np.float32(np.nan).tobytes() + records[largest][4:]
    with zipfile.ZipFile(checkpoint, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return folder


def test_5_convert_refuses_a_nan_weight(tmp_path, capsys):
    import convert_torch_weights

    release, out = _poisoned_release(tmp_path / "release"), tmp_path / "model"
    assert convert_torch_weights.main(["--release", str(release), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "weight params/" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def _codes_file(folder: Path) -> Path:
    from conftest import FIXTURES

    path = folder / "codes.npy"
    np.save(path, np.load(FIXTURES / "release_tiny" / "expected.npz")["out/codes_speech48k"][0])
    return path


def test_5_load_refuses_a_nan_weight(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import infer

    variables, _ = ckpt_lib.load_model_dir(tiny_checkpoint)
    name = sorted(variables["trainable"])[0]
    leaf = variables["trainable"][name]
    while isinstance(leaf, dict):
        name, leaf = f"{name}/{sorted(leaf)[-1]}", leaf[sorted(leaf)[-1]]
    leaf.reshape(-1)[3] = np.inf
    model = tmp_path / "model"
    with monkeypatch.context() as patch:  # written as by a version without the check
        patch.setattr(ckpt_lib, "non_finite", lambda array: None)
        ckpt_lib.save_model_dir(model, variables, (tiny_checkpoint / "config.yaml").read_text())
    rc = infer.main(["--checkpoint", str(model), "--steps", "1", "--decode", str(_codes_file(tmp_path)),
                     "-o", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and str(model) in err[0] and f"trainable/{name}" in err[0], err


def test_5_non_finite_audio_is_never_written(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import infer
    from almtok_jax.tokenizer import ALMTokenizer2

    def nan_decode(self, codes, *args, **kwargs):
        return [{"wave": np.full(2400, np.nan, np.float32)} for _ in codes]

    monkeypatch.setattr(ALMTokenizer2, "decode_clips", nan_decode)
    rc = infer.main(["--checkpoint", str(tiny_checkpoint), "--decode", str(_codes_file(tmp_path)),
                     "-o", str(tmp_path / "out")])
    assert rc == 1 and "not finite" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())


# -------------------------------------------------------------------------- 6: evaluate, length mismatch


def test_6_a_reconstruction_of_half_the_length_is_not_scored(tmp_path):
    import csv

    import soundfile as sf
    from conftest import AUDIO

    from almtok_jax.cli import evaluate

    ref, deg = tmp_path / "ref", tmp_path / "deg"
    ref.mkdir(), deg.mkdir()
    wav, rate = sf.read(AUDIO / "speech" / "p225_001.wav", dtype="float32")
    for name, cut in (("half", wav.size // 2), ("near", wav.size - rate // 50)):
        sf.write(ref / f"{name}.wav", wav, rate)
        sf.write(deg / f"{name}.wav", wav[:cut], rate)
    summary = evaluate.main(["--references-only", str(ref), str(deg), "-o", str(tmp_path / "out"), "--plots", "0"])
    rows = {r["file"]: r for r in csv.DictReader(open(tmp_path / "out" / "metrics.csv"))}
    assert rows["half"]["si_sdr"] == "" and "length" in rows["half"]["error"], rows["half"]
    assert f"{wav.size // 2 / rate:.2f} s" in rows["half"]["error"]
    assert rows["near"]["error"] == ""  # 20 ms short: within the tolerance
    assert summary["metrics"]["si_sdr"]["count"] == 1 and "length" in summary["settings"]["alignment"]


# ------------------------------------------------------------------ 8: huge audio, non-finite guidance


def test_8_huge_amplitudes_and_non_finite_guidance_are_refused(tiny_checkpoint, tmp_path, capsys):
    import soundfile as sf

    import infer

    loud = tmp_path / "loud.wav"
    sf.write(loud, np.full(4800, 1e20, np.float32), 24000, subtype="FLOAT")
    out = tmp_path / "out"
    assert infer.main(["--checkpoint", str(tiny_checkpoint), "--encode-only", str(loud), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(loud) in err and "1e+20" in err, err
    assert not list(out.iterdir())
    for value in ("nan", "inf"):
        rc = infer.main(["--checkpoint", str(tiny_checkpoint), "--guidance", value, str(loud), "-o", str(out)])
        _one_line_error(capsys, rc, "guidance", value)


# --------------------------------------------------------------------- 7, 13, 14, 16: train.py


def _train(workdir: Path, steps: int, *args: str) -> None:
    from conftest import AUDIO

    import train

    train.main(["--config", str(REPO / "configs" / "train_toy.yaml"), "--workdir", str(workdir), "--steps",
                str(steps), f"data.train={AUDIO / 'speech'}", *args])


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _restored_leaves(workdir: Path, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return [np.asarray(x) for x in jax_leaves(ckptr.restore(workdir / "checkpoints" / str(step) / "state"))]


def jax_leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def test_7_a_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
    workdir, export = tmp_path / "run", tmp_path / "export"
    with pytest.raises(SystemExit) as stopped:
        _train(workdir, 12, "optimizer.learning_rate=1e9", "schedule.warmup_steps=0", "checkpoint.every=1",
               "checkpoint.keep=2", "max_skipped_in_a_row=3", "--export", str(export))
    message = str(stopped.value.code)
    assert "not finite" in message and "step" in message and "learning_rate" in message, message
    assert not export.exists()
    steps = _checkpoints(workdir)
    assert steps and max(steps) < 12
    for step in steps:
        assert all(np.all(np.isfinite(x)) for x in _restored_leaves(workdir, step) if x.dtype.kind == "f")


def test_7_a_flipped_byte_in_a_checkpoint_is_detected_on_restore(tmp_path, capsys):
    workdir = tmp_path / "run"
    _train(workdir, 2, "checkpoint.every=1", "checkpoint.keep=5")
    data = max((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    _train(workdir, 3, "checkpoint.every=1", "checkpoint.keep=5", "--resume")
    err = capsys.readouterr().err
    assert "checkpoint 2" in err and "checksum" in err and "falling back to step 1" in err, err[-3000:]


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT (Ctrl-C), SIGTERM (a preempted VM)
def test_13_a_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    from conftest import AUDIO

    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/train_toy.yaml", "--workdir",
                                 str(workdir), "--steps", "100000", f"data.train={AUDIO / 'speech'}",
                                 "checkpoint.every=100000"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 128 + signum and "Traceback" not in text, text[-3000:]
    steps = _checkpoints(workdir)
    assert len(steps) == 1 and f"stopped by {'SIGINT' if signum == 2 else 'SIGTERM'} at step {steps[0]}" in text
    assert f"checkpoint {steps[0]} saved" in text


def test_14_an_export_folder_in_use_is_refused_before_training(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as refused:
        _train(tmp_path / "run", 1, "--export", str(export))
    message = str(refused.value.code)
    assert message.startswith("error: ") and str(export) in message and "--force" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and (export / "notes.txt").read_text() == "mine"


def test_16_train_data_naming_only_missing_files_is_one_line(tmp_path):
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"c{k}\t{tmp_path / f'missing{k}.wav'}\t1.0\t24000\n" for k in range(3)))
    start = time.time()
    with pytest.raises(SystemExit) as refused:
        _train(tmp_path / "run", 1, f"data.train={listing}")
    message = str(refused.value.code)
    assert message.startswith("error: ") and str(listing) in message and "missing0.wav" in message, message
    assert time.time() - start < 30


# ------------------------------------------------------------------- 10: resampling in bounded memory

_RESAMPLE_UNDER_CEILING = textwrap.dedent("""
    import resource, struct, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB of address space, JAX included
    from pathlib import Path
    import numpy as np
    import soundfile as sf
    from almtok_jax.audio import AudioError, load_mono
    folder = Path(sys.argv[1])
    rate = 44101  # gcd with 24000 is 1: the exact kernel would be (24000, 44125) values
    t = np.arange(rate // 2) / rate
    sf.write(folder / "odd.wav", 0.5 * np.sin(2 * np.pi * 440 * t), rate)
    out = load_mono(folder / "odd.wav", 24000)
    ideal = 0.5 * np.sin(2 * np.pi * 440 * np.arange(out.size) / 24000)
    inner = slice(200, out.size - 200)
    print("length", out.size, "error", float(np.max(np.abs(out[inner] - ideal[inner]))))
    data = bytearray((folder / "odd.wav").read_bytes())
    struct.pack_into("<I", data, 24, 2147483647)  # the header's sample rate
    (folder / "absurd.wav").write_bytes(bytes(data))
    try:
        load_mono(folder / "absurd.wav", 24000)
    except AudioError as e:
        print("refused", e)
""")


def test_10_any_rate_resamples_in_bounded_memory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _RESAMPLE_UNDER_CEILING, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    length, error = out.split("length ")[1].split()[0], float(out.split("error ")[1].split()[0])
    assert int(length) == 12000 and error < 1e-3, out
    assert f"{tmp_path / 'absurd.wav'}" in out and "2147483647" in out, out[-3000:]


# ------------------------------------------------------------------------ 11: declared sizes, checked first

_UNDER_CEILING = textwrap.dedent("""
    import resource, runpy, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB of address space, JAX included
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _run_under_ceiling(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", _UNDER_CEILING, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_11_a_huge_declared_position_table_is_refused_before_allocating(tiny_checkpoint, tmp_path):
    import shutil

    import yaml
    from conftest import FIXTURES

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["dit"]["num_positional_embeddings"] = 10**12
    (model / "config.yaml").write_text(yaml.safe_dump(config))
    done = _run_under_ceiling("infer.py", "--checkpoint", str(model), "--decode", str(_codes_file(tmp_path)),
                              "-o", str(tmp_path / "out"))
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    assert "config.yaml" in err[0] and "num_positional_embeddings" in err[0] and "1000000000000" in err[0]

    release = tmp_path / "release"
    shutil.copytree(FIXTURES / "release_tiny", release)
    stated = json.loads((release / "model_config.json").read_text())
    stated["num_positional_embeddings"] = 10**12
    (release / "model_config.json").write_text(json.dumps(stated))
    done = _run_under_ceiling("convert_torch_weights.py", "--release", str(release), "--out", str(tmp_path / "new"))
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(err) == 1 and "num_positional_embeddings" in err[0], done.stderr[-3000:]


# --------------------------------------------------------------------- 16, 17: messages that name things


@pytest.mark.parametrize("content", [b"sq_resume: [unclosed\n", b"\xff\xfe\x00\x81 binary"])
def test_16_17_a_release_config_yaml_that_is_not_yaml_is_one_line_naming_it(tmp_path, capsys, content):
    import shutil

    from conftest import FIXTURES

    import convert_torch_weights

    release = tmp_path / "release"
    shutil.copytree(FIXTURES / "release_tiny", release)
    (release / "config.yaml").write_bytes(content)
    rc = convert_torch_weights.main(["--release", str(release), "--out", str(tmp_path / "model")])
    _one_line_error(capsys, rc, str(release / "config.yaml"), "YAML")


def test_17_broken_links_and_one_file_twice_are_named_as_such(tmp_path, capsys):
    import infer

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    rc = infer.main(["--checkpoint", str(tmp_path / "unused"), str(folder), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "pipe" not in err, err
    assert "dangling.wav: a symbolic link to a missing file" in err and "loop.wav: a symbolic link loop" in err, err
    real = _clip(tmp_path / "real.wav")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.wav").symlink_to(real)
    rc = infer.main(["--checkpoint", str(tmp_path / "unused"), str(tmp_path / "a" / "x.wav"),
                     str(tmp_path / "b" / "x.wav"), "-o", str(tmp_path / "out")])
    _one_line_error(capsys, rc, "are the same file", str(real))


def test_17_timedelta_codes_and_a_huge_seed_are_refused_as_such(tmp_path, capsys):
    import infer
    from almtok_jax.tokenizer import check_codes

    with pytest.raises(ValueError, match="integer array"):
        check_codes(np.zeros((8, 4), "m8[s]"), 8, 64, "codes.npy")
    with pytest.raises(SystemExit) as usage:
        infer.main(["--checkpoint", str(tmp_path), "--seed", str(2**64), str(tmp_path / "x.wav")])
    assert usage.value.code == 2 and "--seed" in capsys.readouterr().err


# ------------------------------------------------------------------ 15: a failed input leaves no file


def test_15_a_failed_save_leaves_no_codes_behind(tiny_checkpoint, tmp_path, capsys):
    import infer

    out = tmp_path / "out"
    (out / "x.wav").mkdir(parents=True)  # the wave output cannot be written
    rc = infer.main(["--checkpoint", str(tiny_checkpoint), "--steps", "1", str(_clip(tmp_path / "x.wav")),
                     "-o", str(out)])
    assert rc == 1 and "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["x.wav"] and not list((out / "x.wav").iterdir())


def test_15_a_full_disk_is_named_as_such():
    from almtok_jax.cli.infer import wav_writer

    with pytest.raises(OSError, match="No space left on device"):
        wav_writer(np.zeros(24000, np.float32), 24000)("/dev/full")  # writes fail with ENOSPC


# ----------------------------------------------------------------------------- 18: what the README claims


def test_18_the_readme_says_what_multi_process_training_reproduces():
    paragraph = next(p for p in (REPO / "README.md").read_text().split("\n\n") if "2 processes × 4 devices" in p)
    text = " ".join(paragraph.split())
    assert "exactly like 1 × 8" not in text and "float32 rounding" in text and "not bit-identical" in text
