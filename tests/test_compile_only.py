"""The TPU compiler on this CPU machine: the tiny train step and decode window compiled for a v5e-4 slice.

Needs libtpu (the ``tpu`` extra). ``.ci/run`` installs it, and under CI (``CI`` set, as CI runs ``.ci/run``) there
a missing libtpu fails these tests instead of skipping them. The programs are kept as small as the real
steps allow (1 s segments, one clip per chip, the decode window at one row per chip); the persistent
compilation cache does not hold TPU programs across CI runs, so each run pays the compile.
"""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import pytest

from almtok_jax.config import load_model_config
from almtok_jax.train.compile_only import SLICES, compile_inference, compile_train, slice_devices, with_clips_per_chip
from almtok_jax.train.config import load_train_config

if importlib.util.find_spec("libtpu") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but libtpu is not installed (.ci/run installs the tpu extra)")
    pytest.skip("libtpu not installed (pip install -e '.[tpu]')", allow_module_level=True)

TOPOLOGY = "v5e-4"


@pytest.fixture(scope="module")
def slice4():
    devices, chip = slice_devices(TOPOLOGY)
    assert len(devices) == 4 and SLICES[TOPOLOGY].chip == "v5e"
    return devices, chip


@pytest.fixture(scope="module")
def tiny_train_report(slice4):
    devices, chip = slice4
    config = load_train_config("train_tiny", ["mesh.data=1", "mesh.fsdp=4", "data.segment_seconds=1.0"])
    with jax.default_matmul_precision("default"):  # as train.py runs it (conftest asks for "highest")
        return compile_train(with_clips_per_chip(config, 1, len(devices)), devices, chip)


def test_tiny_train_step_compiles_for_tpu(tiny_train_report):
    r = tiny_train_report
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["global_batch"] == 4
    # The compiler keeps our shardings, and its per-chip arguments are exactly the shards of the state,
    # frozen parts and batch it uses, in the TPU layouts it chose ((8, 128) tiles and the like: at least
    # the plain bytes).
    assert r["input_shardings_kept"]
    plain = r["input_bytes_per_chip"] - r["unused_input_bytes_per_chip"]
    assert r["memory"]["argument"] == r["tiled_input_bytes_per_chip"] >= plain
    # The donated state comes back in place (aliased): the outputs beyond it are the metrics alone.
    assert r["memory"]["alias"] > 0 and r["memory"]["output"] - r["memory"]["alias"] < 64 * 1024
    assert r["memory"]["fits"] and r["flops_per_chip"] > 0 and r["findings"]["host_callbacks"] == 0


def test_fsdp_leaves_are_a_quarter_per_chip(tiny_train_report):
    for part in ("trainable", "optimizer", "frozen"):
        b = tiny_train_report["state_bytes"][part]
        assert b["split"] > b["total"] / 2, part  # most of the bytes are in leaves FSDP splits
        assert b["per_chip"] == b["total"] - b["split"] + b["split"] // 4, part


def test_tiny_decode_window_compiles_for_tpu(slice4):
    devices, chip = slice4
    with jax.default_matmul_precision("default"):
        [window] = compile_inference(load_model_config("tiny_release"), devices, chip, 1, "float32", 0,
                                     steps=("decode_window",))
    assert window["input_shardings_kept"] and window["memory"]["argument"] == window["tiled_input_bytes_per_chip"]
    assert window["memory"]["fits"] and window["findings"]["host_callbacks"] == 0
    assert window["flops_per_chip"] > 0 and math.isfinite(window["step_s_at_peak"])
