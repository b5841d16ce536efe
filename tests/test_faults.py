"""The second fault and bad-input sweep (issue 28): each test names its item number."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from almtok_jax.train import checkpoint as ckpt_lib

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
    from almtok_jax.train.checkpoint import save_model_dir
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
