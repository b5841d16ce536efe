"""Remote storage: work directory, checkpoints, export, data list and audio given as ``gs://`` URIs.

The bucket is the offline stand-in of ``tests/mock_gcs.py`` (``gs://BUCKET/KEY`` = ``ROOT/BUCKET/KEY``),
under which ``pathlib.Path("gs://...")`` raises: a location wrapped in ``pathlib`` anywhere fails the run.
``train.py`` (toy task, one device) trains, checkpoints, resumes and exports through the bucket; a model
directory in the bucket loads with ``ALMTokenizer2.load``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import mock_gcs
import numpy as np
import pytest
import yaml

from almtok_jax.config import load_model_config, to_dict
from almtok_jax.model import abstract_variables
from almtok_jax.tokenizer import ALMTokenizer2
from almtok_jax.weights.model_dir import load_model_dir, save_model_dir, split_variables

REPO = Path(__file__).resolve().parents[1]
AUDIO = Path(os.environ.get("ALMTOK_SHARED", REPO.parent / "shared")).resolve() / "audio"


def _train(root: Path, cwd: Path, *args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO),
           "JAX_COMPILATION_CACHE_DIR": str(root.parent / "jax_cache")}
    cmd = [sys.executable, str(REPO / "tests" / "mock_gcs.py"), str(root), str(REPO / "train.py"),
           "--config", str(REPO / "configs" / "train_toy.yaml"), "--workdir", "gs://bucket/runs/toy",
           "data.train=gs://bucket/data/train.tsv", "checkpoint.every=2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("storage")
    root, cwd = base / "gcs", base / "cwd"
    clips = root / "bucket" / "data" / "clips"
    clips.mkdir(parents=True)
    cwd.mkdir()
    lines = []
    for wav in sorted((AUDIO / "speech").glob("*.wav")):
        shutil.copy(wav, clips / wav.name)
        lines.append(f"{wav.stem}\tclips/{wav.name}\t3.0\t24000")  # relative to the list's folder
    (root / "bucket" / "data" / "train.tsv").write_text("\n".join(lines) + "\n")
    first = _train(root, cwd, "--steps", "4")
    second = _train(root, cwd, "--steps", "6", "--resume", "--export", "gs://bucket/export")
    return {"root": root, "cwd": cwd, "logs": (first, second)}


def test_training_writes_checkpoints_metrics_and_export_in_the_bucket(bucket):
    run = bucket["root"] / "bucket" / "runs" / "toy"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"4", "6"}
    assert (run / "config.yaml").is_file() and (run / "sharding.json").is_file()
    export = bucket["root"] / "bucket" / "export"
    assert (export / "config.yaml").is_file() and (export / "params").is_dir()
    assert "resumed from step 4" in bucket["logs"][1]
    assert not any(p.name.startswith("gs:") for p in bucket["cwd"].rglob("*"))  # nothing written locally


def test_export_in_the_bucket_restores(bucket, monkeypatch):
    mock_gcs.install(str(bucket["root"]), monkeypatch)
    variables, config = load_model_dir("gs://bucket/export")
    assert config == {"model": "tests.toy_task:toy_task"} and set(variables) == {"frozen", "trainable", "extra"}
    assert variables["extra"]["codebook"]["embed"].shape == (16, 8)


def test_model_dir_in_the_bucket_loads_with_tokenizer_load(tmp_path, monkeypatch):
    mock_gcs.install(str(tmp_path), monkeypatch)
    with pytest.raises(mock_gcs.PathConversionError):
        Path("gs://bucket/x")  # the guard is active
    config = load_model_config("tiny_release")
    shapes = abstract_variables(config)
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    save_model_dir("gs://bucket/models/tiny", split_variables(variables), yaml.safe_dump(to_dict(config)))
    assert (tmp_path / "bucket" / "models" / "tiny" / "params").is_dir()
    tok = ALMTokenizer2.load("gs://bucket/models/tiny")
    leaf = jax.tree.leaves(tok.variables["quantizer"])[0]
    assert tok.config == config and np.all(np.asarray(leaf) == 0.5)
