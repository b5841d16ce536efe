"""``ALMTokenizer2.from_pretrained`` and the conversion cache behind it (``almtok_jax.weights.hub``), offline:
a stand-in hub (``tests/fake_hub.py``) serves the tiny release."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import AUDIO, FIXTURES, REPO

import almtok_jax.weights.hub as hub_cache_module
from almtok_jax import ALMTokenizer2
from almtok_jax.weights.hub import FORMAT_VERSION, MANIFEST, entry_path, entry_problem
from almtok_jax.weights.model_dir import ModelDirError
from tests.fake_hub import fake_hub

RELEASE = FIXTURES / "release_tiny"
REPO_ID = "Dongchao/almtokenizer2"
FILES_READ = ["config.yaml", "ep5.checkpoint", "model_config.json", "sq_config.yaml", "sqcodec.pth",
              "whisper-medium/config.json"]


def same_weights(a: ALMTokenizer2, b: ALMTokenizer2) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a.variables, b.variables)))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny release converted once from the stand-in hub (shared by this module)."""
    cache = tmp_path_factory.mktemp("almtok_cache")
    requested: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE, requested))
        ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=cache)
    assert sorted(requested) == FILES_READ  # only the files the converter reads, each once
    return cache


def test_hub_id_converts_once_then_loads_offline(hub_cache, tiny_checkpoint, monkeypatch, capsys):
    entry = entry_path(REPO_ID, cache_dir=hub_cache)
    assert entry == hub_cache / "hub" / "Dongchao--almtokenizer2" / "main" / f"format{FORMAT_VERSION}"
    assert entry_problem(entry) is None
    # Offline, with a hub that fails on any call: the cached entry is loaded without asking it anything.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE, fail=OSError("offline")))
    tok = ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=hub_cache)
    assert "converting" not in capsys.readouterr().err
    assert same_weights(tok, ALMTokenizer2.load(tiny_checkpoint))
    # Another revision is another entry: offline, it cannot be fetched, and says so on one line.
    with pytest.raises(ModelDirError, match=r"could not download .* with HF_HUB_OFFLINE set .*offline"):
        ALMTokenizer2.from_pretrained(REPO_ID, revision="v2", cache_dir=hub_cache)
    assert not (entry.parent.parent / "v2").exists()  # a failed download leaves nothing behind


def test_compat_and_sampler_options_pass_through(hub_cache):
    tok = ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=hub_cache, compat="release", steps=3)
    assert tok.compat == "release"
    sampler = tok.sampler_config()
    assert (sampler.solver, sampler.num_steps) == ("euler", 3)
    assert tok.sampler_config(steps=7).num_steps == 7  # a call's own option still wins
    tok = ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=hub_cache, solver="midpoint", guidance=2.5)
    assert (tok.sampler_config().solver, tok.sampler_config().guidance_scale) == ("midpoint", 2.5)
    with pytest.raises(ValueError, match="release mode runs the reference's euler sampler"):
        ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=hub_cache, compat="release", solver="rk4")


def test_local_release_folder_and_model_directory(tmp_path, tiny_checkpoint, copying_converter, capsys):
    cache = tmp_path / "cache"
    tok = ALMTokenizer2.from_pretrained(RELEASE, cache_dir=cache)
    assert "converting" in capsys.readouterr().err and copying_converter[0].parent.parent == cache / "local"
    (entry,) = (cache / "local").glob(f"release_tiny-*/format{FORMAT_VERSION}")
    assert entry_problem(entry) is None
    ALMTokenizer2.from_pretrained(RELEASE, cache_dir=cache)
    assert "converting" not in capsys.readouterr().err
    direct = ALMTokenizer2.from_pretrained(tiny_checkpoint, cache_dir=tmp_path / "unused")
    assert same_weights(tok, direct) and not (tmp_path / "unused").exists()
    with pytest.raises(ModelDirError, match="no such folder"):
        ALMTokenizer2.from_pretrained(tmp_path / "nowhere", cache_dir=cache)


@pytest.fixture
def copying_converter(monkeypatch, tiny_checkpoint) -> list[Path]:
    """Conversion replaced by a copy of the session's converted tiny model (the cache's mechanics are under
    test, not conversion, which the module's hub_cache fixture runs for real); returns the folders built."""
    built: list[Path] = []

    def convert(release, out, *args):
        built.append(out)
        shutil.copytree(tiny_checkpoint, out)

    monkeypatch.setattr(hub_cache_module, "convert_release", convert)
    return built


def test_damaged_entry_is_detected_and_rebuilt(hub_cache, tmp_path, tiny_checkpoint, copying_converter,
                                               monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE))
    entry = entry_path(REPO_ID, cache_dir=cache)
    data = max((p for p in entry.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    # A truncated file no longer matches the manifest.
    data.write_bytes(data.read_bytes()[:100])
    tok = ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=cache)
    err = capsys.readouterr().err
    assert f"cache entry {entry} is damaged" in err and "has 100 bytes" in err and "rebuilding" in err
    assert same_weights(tok, ALMTokenizer2.load(tiny_checkpoint))
    # Same size, other bytes: the manifest passes, the weights do not read; rebuilt once.
    metadata = entry / "params" / "_METADATA"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)
    tok = ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=cache)
    assert "is damaged (its weights cannot be read); rebuilding" in capsys.readouterr().err
    assert same_weights(tok, ALMTokenizer2.load(tiny_checkpoint))
    assert len(copying_converter) == 2
    assert sorted(p.name for p in entry.parent.iterdir()) == ["format1", "format1.lock"]


# ----------------------------------------------------------------------------------- several processes

CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests import fake_hub
fake_hub.install(Path({release!r}), log=Path({log!r}), delay_s={delay})
Path({ready!r}).touch()
while len(list(Path({ready!r}).parent.glob("ready-*"))) < {peers}:  # start together
    time.sleep(0.01)
{patch}
from almtok_jax import ALMTokenizer2
tok = ALMTokenizer2.from_pretrained({repo_id!r}, cache_dir={cache!r})
print("loaded", tok.codebook_size)
"""


def start_child(tmp_path: Path, cache: Path, name: str, peers: int, delay: float = 0.0,
                patch: str = "") -> subprocess.Popen:
    script = CHILD.format(repo=str(REPO), release=str(RELEASE), log=str(tmp_path / "downloads.log"), delay=delay,
                          ready=str(tmp_path / f"ready-{name}"), peers=peers, patch=patch, repo_id=REPO_ID,
                          cache=str(cache))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def copy_instead_of_converting(tiny_checkpoint: Path, then: str = "") -> str:
    """Child-process code replacing conversion by a copy of the session's converted tiny model."""
    return ("import shutil, almtok_jax.weights.hub as h\n"
            "def copied(release, out, *args):\n"
            f"    shutil.copytree({str(tiny_checkpoint)!r}, out)\n{then}"
            "h.convert_release = copied")


def test_two_processes_convert_once(tmp_path, tiny_checkpoint):
    cache = tmp_path / "cache"
    children = [start_child(tmp_path, cache, name, peers=2, delay=0.2,
                            patch=copy_instead_of_converting(tiny_checkpoint, "    time.sleep(1)\n"))
                for name in "ab"]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
        assert "loaded 64" in out
    assert sum(err.count("converting Dongchao/almtokenizer2@main") for _, err in outputs) == 1
    downloads = (tmp_path / "downloads.log").read_text().splitlines()
    assert sorted({line.split()[1] for line in downloads}) == FILES_READ  # only the files read
    entry = entry_path(REPO_ID, cache_dir=cache)
    assert entry_problem(entry) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == ["format1", "format1.lock"]


def test_killed_conversion_leaves_no_entry(tmp_path, tiny_checkpoint, copying_converter):
    """kill -9 after the model directory is written but before it is renamed into place: no entry is
    found afterwards, and the next call sweeps the leftover and converts again."""
    cache = tmp_path / "cache"
    stall = copy_instead_of_converting(tiny_checkpoint, "    print('written', flush=True)\n    time.sleep(600)\n")
    child = start_child(tmp_path, cache, "killed", peers=1, patch=stall)
    assert child.stdout.readline().strip() == "written"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    entry = entry_path(REPO_ID, cache_dir=cache)
    assert not entry.exists() and any(entry.parent.glob("format1.tmp-*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE))
        ALMTokenizer2.from_pretrained(REPO_ID, cache_dir=cache)
    assert len(copying_converter) == 1 and entry_problem(entry) is None and (entry / MANIFEST).is_file()
    assert sorted(p.name for p in entry.parent.iterdir()) == ["format1", "format1.lock"]


def test_commands_take_a_hub_id(hub_cache, tmp_path, monkeypatch):
    """``--checkpoint Dongchao/almtokenizer2`` of infer, tokenize and evaluate: the cached entry, offline."""
    import infer
    from almtok_jax.cli import evaluate, tokenize

    monkeypatch.setenv("ALMTOK_CACHE", str(hub_cache))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE, fail=OSError("offline")))
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(AUDIO / "speech" / "p225_001.wav", clips)
    assert infer.main(["--checkpoint", REPO_ID, "--encode-only", str(clips), "-o", str(tmp_path / "codes")]) == 0
    assert np.load(tmp_path / "codes" / "p225_001.codes.npy").shape[0] == 8
    # tokenize loads the model before reading any file: an unreadable file keeps the run short.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"not audio")
    assert tokenize.main(["--checkpoint", REPO_ID, "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "shards"),
                          "--quiet"]) == 0
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["failed"] == 1
    assert evaluate.load_tokenizer(Path(REPO_ID)).codebook_size == 64
