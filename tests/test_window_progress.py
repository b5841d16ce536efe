"""Progress inside one long file: infer and tokenize show each 12 s segment and decoding window go by."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import infer
from almtok_jax.cli import tokenize


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """13 s of tone and noise: two encoder segments and two decoding windows."""
    folder = tmp_path_factory.mktemp("long")
    t = np.arange(13 * 16000) / 16000
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    sf.write(folder / "long.wav", wav.astype(np.float32), 16000)
    return folder / "long.wav"


def test_infer_reports_segments_and_windows(tiny_checkpoint, long_clip, tmp_path, capfd):
    assert infer.main(["--checkpoint", str(tiny_checkpoint), str(long_clip), "-o", str(tmp_path), "--steps", "1"]) == 0
    err = capfd.readouterr().err
    assert "encoding segment 2/2" in err  # both segments in one encoder batch
    assert "decoding window 1/2" in err and "decoding window 2/2" in err
    assert (tmp_path / "long.wav").is_file()


def test_tokenize_reports_segments_of_a_long_file(tiny_checkpoint, long_clip, tmp_path, capfd):
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(long_clip.parent), "--out", str(tmp_path),
            "--batch-segments", "1", "--workers", "1"]
    assert tokenize.main(argv) == 0
    err = capfd.readouterr().err
    assert "encoding segment 1/2" in err and "encoding segment 2/2" in err
