"""Bounded-memory conversion: a few hundred MB of full-size quantizer + fusion weights (the release's key
layout, random values) converted in a subprocess through the lazy reader, in-place layer stacking and the
piecewise model-directory writer; its peak RSS growth is checked against the converted size, and the
result against the all-in-memory conversion of the same file.

Why these components: their kept tensors are large at full size (~540 MB, with stacked layers and
weight-norm transposes), and the other components would take several GB. An ``optimizer`` entry the
converter never selects is written beside ``model`` and must never be read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import traverse_util

from almtok_jax.config import CONFIG_DIR, load_model_config
from almtok_jax.mapping import canonical_key, convert_state_dict
from almtok_jax.model import MODEL_COMPONENTS
from almtok_jax.torch_io import load_state_dict
from almtok_jax.train.checkpoint import load_model_dir
from tests.conftest import FIXTURES, REPO
from tests.torch_zip import write_reference_checkpoint

COMPONENTS = ("fusion", "quantizer")

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from almtok_jax.config import load_model_config
    from almtok_jax.mapping import canonical_key, convert_state_dict
    from almtok_jax.model import MODEL_COMPONENTS
    from almtok_jax.torch_io import open_state_dict
    from almtok_jax.train.checkpoint import load_model_dir, save_model_dir_pieces, to_device

    def rss(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    mode, ckpt, out, config_path, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    config = load_model_config(config_path)
    comps = [c for c in MODEL_COMPONENTS if c.name in names]
    shapes = {c.name: c.shapes(config) for c in comps}  # traced before the baseline
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = rss("VmRSS:")
    if mode == "convert":
        state = open_state_dict(ckpt, select="model")
        def pieces():
            for c in comps:
                rules = c.rules(config)
                part = {k: v for k, v in state.items() if any(r.match(canonical_key(k)) for r in rules)}
                yield ("trainable", c.name), convert_state_dict(part, rules, shapes[c.name], source=c.name)
        save_model_dir_pieces(out, pieces(), "model: test\\n")
    else:
        tree, _ = load_model_dir(out)
        to_device(tree)
    print(json.dumps({"growth": rss("VmHWM:") - base}))
""")


def _peak_growth(*args: str) -> int:
    run = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["growth"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    manifest = json.loads((FIXTURES / "release_full_keys" / "ep5_model_keys.json").read_text())
    config = load_model_config(CONFIG_DIR / "almtokenizer2.yaml")
    rules = [r for c in MODEL_COMPONENTS if c.name in COMPONENTS for r in c.rules(config)]
    model = {k: s for k, s in manifest.items() if any(r.match(canonical_key(k)) for r in rules)}
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ckpt") / "ep5.checkpoint"
    written = write_reference_checkpoint(
        path, {"model": model, "optimizer": {"state.0.exp_avg": (16, 2**20)}},
        lambda name, shape: rng.standard_normal(shape, dtype=np.float32))
    return path, config, written - 16 * 2**22


@pytest.mark.xfail(strict=True, reason="issue 18 not done: measured 1.6x convert / 1.6x load peaks, over the "
                   "1.3x / 1.2x targets (the overhead is in the orbax partial saves and the restore)")
def test_streaming_conversion_peak_and_result(checkpoint, tmp_path):
    path, config, kept_bytes = checkpoint
    assert kept_bytes > 300e6
    out = tmp_path / "model"
    config_path = str(CONFIG_DIR / "almtokenizer2.yaml")
    convert_growth = _peak_growth("convert", str(path), str(out), config_path, *COMPONENTS)
    load_growth = _peak_growth("load", str(path), str(out), config_path, *COMPONENTS)

    eager = load_state_dict(path, select="model")
    streamed = load_model_dir(out)[0]["trainable"]
    for comp in (c for c in MODEL_COMPONENTS if c.name in COMPONENTS):
        rules = comp.rules(config)
        part = {k: v for k, v in eager.items() if any(r.match(canonical_key(k)) for r in rules)}
        want = convert_state_dict(part, rules, comp.shapes(config))
        got = traverse_util.flatten_dict(streamed[comp.name])
        want = traverse_util.flatten_dict(want)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    print(f"kept {kept_bytes / 1e6:.0f} MB: convert peak {convert_growth / kept_bytes:.2f}x, "
          f"load peak {load_growth / kept_bytes:.2f}x")
    assert convert_growth < 1.3 * kept_bytes
    assert load_growth < 1.2 * kept_bytes
