"""Converting a release in bounded memory: a release of a few hundred MB (the tiny release with a
release-width DiT, written in the reference's zip layout by the test helpers) is converted by the real
command in a fresh process, whose peak RSS may grow by only a fraction of the checkpoint (each variable is
read from the checkpoint as it is written, never the whole model at once), and the model directory holds
exactly what the all-in-memory conversion gives."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, REPO
from flax import traverse_util

from almtok_jax.weights.convert import convert_checkpoint
from almtok_jax.weights.model_dir import load_model
from almtok_jax.weights.release import read_release
from almtok_jax.weights.torch_io import load_state_dict
from tests.synthetic_release import Values, tiny_values, wide_dit_shapes, write_release

DIT_BLOCKS = 4  # ~650 MB of tensors; the largest variable (a stacked feed-forward kernel) is 150 MB of it

# The child converts the tiny release first (imports, JAX start-up, tracing: what any conversion costs
# whatever its size), resets its peak-RSS counter, converts the release under test, and reports its RSS
# before and its peak RSS during that conversion alone (VmHWM of /proc/self/status, reset through clear_refs).
CHILD = """
import json, sys
from almtok_jax.cli.convert import main

def status(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

release, out, warm_up = sys.argv[1:]
assert main(["--release", warm_up, "--out", out + ".warm"]) == 0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
assert main(["--release", release, "--out", out]) == 0
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.fixture(scope="module")
def wide_release(tmp_path_factory, shared_dir) -> tuple:
    folder = tmp_path_factory.mktemp("wide_release") / "release"
    model, codec, files = wide_dit_shapes(FIXTURES, DIT_BLOCKS)
    return folder, write_release(folder, model, codec, files, Values(0, tiny_values(FIXTURES)))


def test_conversion_streams_and_equals_the_in_memory_conversion(wide_release, tmp_path):
    folder, checkpoint_bytes = wide_release
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), str(FIXTURES / "release_tiny")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (rss["peak"] - rss["before"]) / checkpoint_bytes
    # Holding the whole model at once (or its largest component, the DiT, nearly all of this release) is at
    # least ~1x; all in memory it was ~2.9x. Streaming measured 0.61x: about 2.2x the largest variable
    # (150 MB), which is the variable and its encoded chunks in flight.
    assert growth < 0.9, f"peak RSS grew by {growth:.2f} x the checkpoint's {checkpoint_bytes / 2**20:.0f} MiB"

    release = read_release(folder)
    in_memory = convert_checkpoint(load_state_dict(release.checkpoint, select="model"),
                                   load_state_dict(folder / "sqcodec.pth", select="codec_model"), release.config)
    written, config = load_model(out)
    assert config == release.config
    want, got = traverse_util.flatten_dict(in_memory), traverse_util.flatten_dict(written)
    assert set(got) == set(want)
    for path, value in want.items():
        value = np.asarray(value)
        assert got[path].dtype == value.dtype and np.array_equal(got[path], value), "/".join(path)


def test_a_damaged_tensor_found_while_writing_leaves_nothing(tmp_path, capsys):
    """Values are read only as they are written, so a damaged tensor (here one flipped byte in the largest
    stored record, the DiT's position table: the index and every shape are fine) surfaces mid-write: the
    command fails naming the file and the record, and neither the model directory nor its temporary folder
    is left behind."""
    import shutil
    import struct
    import zipfile

    import convert_torch_weights

    release = tmp_path / "release"
    shutil.copytree(FIXTURES / "release_tiny", release)
    checkpoint = release / "ep5.checkpoint"
    checkpoint.chmod(0o644)
    with zipfile.ZipFile(checkpoint) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(checkpoint.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0x40
    checkpoint.write_bytes(bytes(data))
    out = tmp_path / "model"
    assert convert_torch_weights.main(["--release", str(release), "--out", str(out)]) == 1
    assert f"{checkpoint}: record '{info.filename}' is corrupt" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".model.*"))
