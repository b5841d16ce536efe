"""Corpus tokenization (``python -m almtok_jax.cli.tokenize``) on the tiny release.

One uninterrupted in-process run (module fixture) is the reference: its codes are checked against
``ALMTokenizer2.encode`` per file, and the 2-process run, the killed-then-resumed run and the run with a
corrupt file are compared with it. Subprocesses get 2 CPU devices each and share a compilation cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from almtok_jax.audio import load_audio, to_mono
from almtok_jax.cli import tokenize
from almtok_jax.records import codes_dataset, decode_record, encode_record, open_records
from almtok_jax.tokenizer import ALMTokenizer2, flatten

# (name, seconds, sample rate, channels): 1 to 2 segments each, shards of 2 files pack segments of both.
CORPUS = [("a_short", 0.3, 24000, 1), ("b_20s", 20.0, 24000, 1), ("c_16k", 1.5, 16000, 1),
          ("d_13s", 13.0, 24000, 1), ("e_stereo48k", 2.0, 48000, 2), ("f_4s", 4.0, 24000, 1)]
RUN = ["--shard-size", "2", "--batch-segments", "4", "--workers", "2", "--quiet"]
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, seconds, rate, channels in CORPUS:
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)[:, None]
        sf.write(folder / f"{name}.wav", (tone + 0.05 * rng.standard_normal((t.size, channels))).astype(np.float32),
                 rate)
    return folder


def _args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert tokenize.main(_args(tiny_checkpoint, corpus, out)) == 0
    return out


def _contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "PYTHONPATH": str(REPO)}


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "almtok_jax.cli.tokenize", *argv], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, log.read_text()[-4000:]


def test_shard_codes_equal_per_file_encode(tiny_checkpoint, corpus, reference):
    tok = ALMTokenizer2.load(tiny_checkpoint)
    records = list(open_records(reference))
    assert [Path(r["path"]).stem for r in records] == [c[0] for c in CORPUS]
    for r, (_, seconds, rate, _) in zip(records, CORPUS, strict=True):
        wav, sr = load_audio(r["path"])
        np.testing.assert_array_equal(r["codes"], tok.encode(wav, sr), err_msg=r["path"])
        assert r["sample_rate"] == rate == sr and r["duration"] == pytest.approx(seconds)
        assert r["num_tokens"] == r["codes"].shape[1]
    tokens = codes_dataset(reference, tokens=True)
    np.testing.assert_array_equal(tokens[3], flatten(records[3]["codes"]))
    header = json.loads((reference / "index.jsonl").read_text().splitlines()[1])
    assert header["shard"] == "shard-00000-of-00003" and header["record"] == 1
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["files"], summary["encoded"], summary["failed"], summary["shards"]) == (6, 6, 0, 3)
    assert summary["hours"] == pytest.approx(sum(c[1] for c in CORPUS) / 3600)
    assert summary["tokens"] == 8 * sum(r["num_tokens"] for r in records)
    assert summary["codec"]["code_dtype"] == "<i2" and summary["bitrate"] == tok.bitrate


def test_record_format_round_trip_and_rejects_bad_bytes():
    codes = np.arange(24, dtype="<i2").reshape(8, 3)
    data = encode_record(codes, {"path": "x.wav", "num_tokens": 3})
    back = decode_record(data)
    np.testing.assert_array_equal(back["codes"], codes)
    assert back["path"] == "x.wav" and back["num_tokens"] == 3
    with pytest.raises(ValueError, match="bad magic"):
        decode_record(b"\x80\x04pickle" + data)
    with pytest.raises(ValueError, match="bytes of codes"):
        decode_record(data[:-2])
    with pytest.raises(ValueError, match="dtype"):
        decode_record(data.replace(b'"<i2"', b'"|O1"'))


def test_two_processes_write_the_same_records(tiny_checkpoint, corpus, reference, tmp_path, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out, env = tmp_path / "out", _env(tmp_path_factory)
    procs = []
    for i in range(2):
        cluster = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append((_start(_args(tiny_checkpoint, corpus, out), {**env, **cluster}, tmp_path / f"p{i}.log"),
                      tmp_path / f"p{i}.log"))
    try:
        for proc, log in procs:
            _wait(proc, log)
    finally:
        for proc, _ in procs:
            proc.kill()
    assert "process 1/2: 1 of 1 shards encoded" in (tmp_path / "p1.log").read_text()
    assert _contents(out) == _contents(reference)


def test_kill_then_rerun_is_byte_identical(tiny_checkpoint, corpus, reference, tmp_path, tmp_path_factory):
    out, log = tmp_path / "out", tmp_path / "killed.log"
    proc = _start(_args(tiny_checkpoint, corpus, out), _env(tmp_path_factory), log)
    first = out / "shard-00000-of-00003.json"
    deadline = time.monotonic() + TIMEOUT_S
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), log.read_text()[-4000:]
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    assert tokenize.main(_args(tiny_checkpoint, corpus, out)) == 0
    assert _contents(out) == _contents(reference)


def test_corrupt_file_is_a_failure_and_nothing_else_changes(tiny_checkpoint, corpus, reference, tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file")
    files = [corpus / f"{c[0]}.wav" for c in CORPUS] + [bad]
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"{p.stem}\t{p}\t0\t24000\n" for p in files))
    out = tmp_path / "out"
    assert tokenize.main(_args(tiny_checkpoint, listing, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["encoded"], summary["failed"]) == (7, 6, 1)
    (failure,) = summary["failures"]
    assert failure["path"] == str(bad) and failure["index"] == 6 and "cannot read audio" in failure["reason"]
    strip = [{k: v for k, v in r.items() if k != "codes"} | {"codes": r["codes"].tolist()}
             for r in open_records(out)]
    expected = [{k: v for k, v in r.items() if k != "codes"} | {"codes": r["codes"].tolist()}
                for r in open_records(reference)]
    assert strip == expected
    assert tokenize.main(_args(tiny_checkpoint, listing, out, "--strict")) == 1


def test_encode_is_batch_invariant(tiny_checkpoint, corpus, reference):
    """A clip's codes are the same through the tokenize command (the reference records), inside
    ``encode_batch`` beside clips of other lengths and rates (in two orders and groupings, so its segments
    share padded batches with other clips' segments) and encoded alone (every clip alone: the test above)."""
    tok = ALMTokenizer2.load(tiny_checkpoint)
    records = {Path(r["path"]).stem: r["codes"] for r in open_records(reference)}
    clips = {name: load_audio(corpus / f"{name}.wav") for name, *_ in CORPUS}
    clips = {name: (to_mono(wav), sr) for name, (wav, sr) in clips.items()}
    for order in ([c[0] for c in CORPUS], ["d_13s", "c_16k"]):
        batch = tok.encode_batch([clips[n][0] for n in order], [clips[n][1] for n in order])
        for name, codes in zip(order, batch, strict=True):
            np.testing.assert_array_equal(codes, records[name], err_msg=f"{name} in batch {order}")
    for name in ("d_13s", "c_16k"):
        np.testing.assert_array_equal(tok.encode(*clips[name]), records[name], err_msg=f"{name} alone")
