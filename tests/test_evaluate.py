"""The evaluate CLI: folder-vs-folder scoring, per-file failures, outputs, the model path with a stand-in."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO, REPO

from almtok_jax.cli import evaluate
from almtok_jax.flow.cfm import SamplerConfig

CLIPS = ("p225_001", "p231_001")  # the two shortest speech clips


@pytest.fixture()
def references(tmp_path) -> Path:
    folder = tmp_path / "ref"
    folder.mkdir()
    for name in CLIPS:
        shutil.copy(AUDIO / "speech" / f"{name}.wav", folder)
    return folder


def read_outputs(out: Path) -> tuple[list[dict[str, str]], dict]:
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "summary.json").read_text())


def test_identical_folders_from_the_command_line(references, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "almtok_jax.cli.evaluate", "--references-only", str(references), str(references),
           "-o", str(out), "--plots", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    rows, summary = read_outputs(out)
    assert [r["file"] for r in rows] == list(CLIPS) and all(r["error"] == "" for r in rows)
    m = summary["metrics"]
    assert m["pesq_wb"]["mean"] == pytest.approx(4.644, abs=0.005)
    assert m["pesq_nb"]["mean"] == pytest.approx(4.549, abs=0.005)
    assert m["stoi"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert m["mrstft"]["mean"] == 0.0 and m["mel_distance"]["mean"] == 0.0
    assert m["si_sdr"]["mean"] > 100
    assert all(s["count"] == 2 for s in m.values())
    assert summary["files"] == 2 and summary["files_with_errors"] == 0 and summary["bitrate_bps"] is None
    assert summary["settings"]["eval_sample_rate"] == 16000
    assert [p.name for p in (out / "plots").iterdir()] == [f"{CLIPS[0]}.png"]


def test_noisy_folder_scores_lower_and_failures_are_recorded(references, tmp_path):
    shutil.copy(AUDIO / "speech" / "p232_001.wav", references)  # its degraded copy will be silent
    shutil.copy(AUDIO / "speech" / "p266_005.wav", references)  # no degraded copy at all
    degraded = tmp_path / "deg"
    degraded.mkdir()
    for i, name in enumerate(CLIPS):
        wav, sr = sf.read(references / f"{name}.wav")
        noise = np.array(jax.random.normal(jax.random.key(i), wav.shape), np.float64)
        noise *= np.sqrt(np.mean(wav ** 2) / np.mean(noise ** 2) / 10 ** (10 / 10))  # 10 dB SNR at 24 kHz
        sf.write(degraded / f"{name}.flac", wav + noise, sr)  # matched by name, not extension
    silence = np.zeros(round(sf.info(AUDIO / "speech" / "p232_001.wav").duration * 24000))  # of the same length
    sf.write(degraded / "p232_001.wav", silence, 24000)
    sf.write(degraded / "extra.wav", np.zeros(24000), 24000)

    out = tmp_path / "out"
    summary = evaluate.main(["--references-only", str(references), str(degraded), "-o", str(out)])
    rows, saved = read_outputs(out)
    assert saved == json.loads(json.dumps(summary))
    by_file = {r["file"]: r for r in rows}
    assert "degraded signal is silent" in by_file["p232_001"]["error"]
    assert "no degraded file" in by_file["p266_005"]["error"]
    assert by_file["p232_001"]["pesq_wb"] == ""
    m = summary["metrics"]
    assert all(s["count"] == 2 for s in m.values())
    assert summary["files"] == 4 and summary["files_with_errors"] == 2
    assert summary["metric_failures"]["stoi"] == 2 and summary["unmatched_degraded"] == ["extra"]
    assert m["pesq_wb"]["mean"] < 2.0 and m["pesq_nb"]["mean"] < 2.5 and m["stoi"]["mean"] < 0.95
    assert m["mrstft"]["mean"] > 1.0 and m["mel_distance"]["mean"] > 0.3
    assert 9.0 < m["si_sdr"]["mean"] < 13.0  # 10 dB at 24 kHz; white noise above 8 kHz is cut at 16 kHz
    assert len(list((out / "plots").glob("*.png"))) == 3  # the silent reconstruction is plotted too


class IdentityTokenizer:
    """Stand-in for ALMTokenizer2: codes are the waveform itself in 1920-sample frames (12.5 Hz at 24 kHz)."""

    sample_rate = 24000
    bitrate = 1300.0
    calls: list[int] = []

    @classmethod
    def from_pretrained(cls, checkpoint, compat="default"):
        assert Path(checkpoint).name == "ckpt"
        return cls()

    def encode_batch(self, wavs, sample_rate, progress=None):
        assert sample_rate == self.sample_rate and all(w.ndim == 1 for w in wavs)
        self.calls.append(len(wavs))
        return [np.pad(w, (0, -w.size % 1920)).reshape(-1, 1920).T for w in wavs]

    def decode_clips(self, codes, steps=None, seed=0, lengths=None, progress=None):
        progress("decoding window", 1, 1)
        return [{"wave": c.T.reshape(-1)[:n]} for c, n in zip(codes, lengths, strict=True)]

    def sampler_config(self, steps=None):
        return SamplerConfig(num_steps=steps or 4)


def test_model_mode_batches_trims_and_records_bitrate(references, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "almtok_jax.tokenizer",
                        types.SimpleNamespace(ALMTokenizer2=IdentityTokenizer))
    IdentityTokenizer.calls = []
    (references / "broken.wav").write_bytes(b"not audio")
    shutil.copy(AUDIO / "speech" / "p232_001.wav", references)
    out = tmp_path / "out"
    summary = evaluate.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(references),
                             "-o", str(out), "--batch-size", "2", "--plots", "1", "--save-audio"])
    assert "decoding window 1/1" in capfd.readouterr().err  # progress inside a batch reaches the bar
    rows, _ = read_outputs(out)
    assert [r["file"] for r in rows] == ["broken", *CLIPS, "p232_001"]
    assert "cannot read audio" in rows[0]["error"] and all(r["error"] == "" for r in rows[1:])
    # longest first, in batches of --batch-size clips
    assert IdentityTokenizer.calls == [2, 1]
    assert summary["metrics"]["pesq_wb"]["mean"] == pytest.approx(4.644, abs=0.005)
    assert summary["metrics"]["mrstft"]["mean"] == 0.0 and summary["metrics"]["si_sdr"]["count"] == 3
    assert summary["bitrate_bps"] == 1300.0 and summary["mode"] == "model"
    assert 11.0 < summary["token_rate_hz"] <= 12.5
    saved = sorted(p.name for p in (out / "audio").iterdir())
    assert saved == sorted(f"{n}.wav" for n in (*CLIPS, "p232_001"))
    assert len(list((out / "plots").glob("*.png"))) == 1


def test_list_file_and_bad_arguments(references, tmp_path):
    listing = tmp_path / "clips.txt"
    listing.write_text(f"# two clips\nref/{CLIPS[0]}.wav\n\n{references / CLIPS[1]}.wav\n")
    clips = evaluate.list_audio(listing)
    assert [c.reference for c in clips] == [references / f"{CLIPS[0]}.wav", references / f"{CLIPS[1]}.wav"]
    assert clips[0].name == f"ref/{CLIPS[0]}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        evaluate.list_audio(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate.list_audio(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "x", "-o", "y"])  # --data missing
