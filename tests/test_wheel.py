"""The built wheel works on its own: presets are package data, and convert + infer run on the tiny release
with the installed package from a folder outside the source tree.

The wheel is built without build isolation (no download: setuptools>=77 comes with the ``dev`` extra) from a
copy of the sources and installed with ``--no-deps`` into a fresh virtual environment. Offline, the fresh
environment gets its dependencies through a ``.pth`` line naming the test environment's site-packages (a
plain path: the ``.pth`` files there, among them the editable install of the sources, are not run). Every
command runs with its working directory in a temporary folder, and the test asserts that ``almtok_jax`` was
imported from the fresh environment. The commands run as the wheel's console entry points
(``almtok-convert``, ``almtok-infer``, ...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, FIXTURES, REPO

SOURCES = ("pyproject.toml", "README.md", "configs", "almtok_jax")
ENTRY_POINTS = ("almtok-convert", "almtok-infer", "almtok-train", "almtok-evaluate", "almtok-tokenize")


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """``(fresh virtual environment holding the installed wheel, process environment for it)``."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(root / "dist"), str(src)], root, env)
    (wheel,) = (root / "dist").glob("almtok_jax-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env)
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(purelib.stdout.strip()) / "test_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
          str(wheel)], root, env)
    shutil.rmtree(src)  # nothing can be imported from the copy of the sources any more
    env = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
    return venv, {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_installed_package_converts_and_infers_the_tiny_release(installed, tmp_path):
    venv, env = installed
    run = tmp_path / "run"
    run.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import almtok_jax.config as c; print(c.__file__); "
                  "print(c.preset_path('tiny_release'))"], run, env).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    _run([str(venv / "bin" / "almtok-convert"), "--release", str(FIXTURES / "release_tiny"),
          "--config", "tiny_release", "--out", "model"], run, env)
    assert (run / "model" / "config.yaml").is_file()
    clip = sorted((AUDIO / "speech").glob("*.wav"))[0]
    _run([str(venv / "bin" / "almtok-infer"), "--checkpoint", "model", str(clip), "-o", "out", "--steps", "2"],
         run, env)
    codes = np.load(next((run / "out").rglob("*.codes.npy")))
    assert codes.ndim == 2 and codes.shape[0] == 8
    wave, sr = sf.read(next((run / "out").rglob("*.wav")))
    assert sr == 24000 and wave.size > 0 and np.all(np.isfinite(wave))


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_installed_console_entry_points(installed, tmp_path, command):
    venv, env = installed
    done = _run([str(venv / "bin" / command), "--help"], tmp_path, env)
    assert done.stdout.startswith("usage: ")
