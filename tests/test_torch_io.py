"""Tests of the torch-free, code-execution-free checkpoint reader ``almtok_jax.weights.torch_io``."""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from almtok_jax.weights.torch_io import CheckpointError, Opaque, load_checkpoint_tree, load_state_dict, open_state_dict
from tests.torch_zip import (
    BINPERSID,
    EMPTY_TUPLE,
    NEWFALSE,
    REDUCE,
    dict_,
    g,
    i,
    ints,
    pickle_bytes,
    s,
    tensor,
    tup,
    write_safetensors,
    write_torch_zip,
)

SHARED = Path(os.environ.get("ALMTOK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
READER = SHARED / "fixtures" / "reader"
RELEASE = SHARED / "fixtures" / "release_tiny"

PWNED = Path("/tmp/ALMTOK_PWNED")
PWNED2 = Path("/tmp/ALMTOK_PWNED2")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return path


# ----------------------------------------------------------------------------------------------------
# shared fixtures written by PyTorch / safetensors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "select"),
    [
        ("checkpoint_like_release.pth", "model"),
        ("codec_model.pth", "codec_model"),
        ("plain.safetensors", None),
    ],
)
def test_reader_fixtures_match_expected(name: str, select: str | None) -> None:
    path = _need(READER / name)
    got = load_state_dict(path, select=select)
    with np.load(READER / (path.stem + ".expected.npz")) as expected:
        assert set(got) == set(expected.files)
        for key in expected.files:
            want = expected[key]
            assert isinstance(got[key], np.ndarray), key
            assert got[key].dtype == want.dtype, key
            assert got[key].shape == want.shape, key
            np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_release_like_views_are_independent_copies() -> None:
    sd = load_state_dict(_need(READER / "checkpoint_like_release.pth"), select="model")
    assert sd["scalar"].shape == () and sd["scalar"].dtype == np.float32
    assert sd["view_t"].flags.c_contiguous and sd["view_t"].flags.writeable
    before = sd["shares_storage"].copy()
    sd["view_t"][...] = 0.0
    np.testing.assert_array_equal(sd["shares_storage"], before)


def test_release_like_tree_keeps_other_entries_inert() -> None:
    tree = load_checkpoint_tree(_need(READER / "checkpoint_like_release.pth"))
    assert list(tree) == ["model", "optimizer", "scheduler", "reporter"]
    assert "module.layer.weight" in tree["model"]  # the tree is raw: no prefix stripping
    assert tree["scheduler"] == {"last_epoch": 10, "_step_count": 11}
    exp_avg = tree["optimizer"]["state"][0]["exp_avg"]
    assert isinstance(exp_avg, np.ndarray) and exp_avg.shape == (3,)
    reporter = tree["reporter"]
    assert isinstance(reporter, Opaque)
    assert (reporter.module, reporter.name) == ("__main__", "Reporter")
    assert reporter.state["epoch"] == 5 and reporter.state["stats"]["hist"] == [1, 2, 3]
    assert isinstance(reporter.state["stats"]["loss"], Opaque)


def test_select_none_on_training_checkpoint_suggests_select() -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint_like_release\.pth.*select='model'"):
        load_state_dict(_need(READER / "checkpoint_like_release.pth"))


def test_wrong_subdict_name_lists_available_keys() -> None:
    with pytest.raises(CheckpointError, match=r"'modle'.*\['model', 'optimizer', 'scheduler', 'reporter'\]"):
        load_state_dict(_need(READER / "checkpoint_like_release.pth"), select="modle")


@pytest.mark.parametrize("loader", [lambda p: load_state_dict(p, select="model"), load_checkpoint_tree])
def test_malicious_fixture_is_refused(loader) -> None:
    PWNED.unlink(missing_ok=True)
    path = _need(READER / "malicious.pth")
    with pytest.raises(CheckpointError, match=r"malicious\.pth.*refusing.*system"):
        loader(path)
    assert not PWNED.exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [("truncated.pth", "truncated or corrupt zip"), ("not_a_checkpoint.pth", "not a PyTorch zip checkpoint")],
)
def test_broken_fixtures_are_refused(name: str, reason: str) -> None:
    with pytest.raises(CheckpointError, match=rf"{name}.*{reason}"):
        load_state_dict(_need(READER / name), select="model")


# ----------------------------------------------------------------------------------------------------
# the tiny release
# ----------------------------------------------------------------------------------------------------


def test_release_ep5_checkpoint() -> None:
    sd = load_state_dict(_need(RELEASE / "ep5.checkpoint"), select="model")
    assert len(sd) == 873
    assert not any(k.startswith("module.") for k in sd)
    assert sum("conv_module." in k for k in sd) == 120
    assert sd["cls_token"].shape == (1, 128) and sd["cls_token"].dtype == np.float32
    assert sd["whisper_encoder.conv1.weight"].shape == (64, 80, 3)
    norm = "pretrained_model.model.model.conformer.layers.0.conv_module.layer_norm.weight"
    assert sd[norm].shape == (32,)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == 18
    assert all(sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
    assert {v.dtype for k, v in sd.items() if k not in counters} == {np.dtype(np.float32)}


def test_release_sqcodec() -> None:
    sd = load_state_dict(_need(RELEASE / "sqcodec.pth"), select="codec_model")
    assert len(sd) == 447
    assert sd["encoder.0.weight_v"].shape == (2, 1, 7)
    assert sd["decoder.0.weight_g"].shape == (64, 1, 1)
    assert all(v.dtype == np.float32 for v in sd.values())


# ----------------------------------------------------------------------------------------------------
# hand-made malicious pickles
# ----------------------------------------------------------------------------------------------------


class _Exploit:
    """Under plain ``pickle.load`` this would run ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "exploit",
    [
        _Exploit(os.system, f"touch {PWNED2}"),
        _Exploit(subprocess.call, ["touch", str(PWNED2)]),
        _Exploit(eval, f"__import__('os').system('touch {PWNED2}')"),
        _Exploit(getattr, "text", "upper"),
    ],
    ids=["os.system", "subprocess.call", "builtins.eval", "builtins.getattr"],
)
def test_handmade_exploit_is_refused_and_not_run(tmp_path: Path, exploit: _Exploit) -> None:
    PWNED2.unlink(missing_ok=True)
    payload = pickle.dumps({"model": {"w": exploit}}, protocol=2)
    globals_used = [arg for op, arg, _ in pickletools.genops(payload) if op.name == "GLOBAL"]
    assert payload.startswith(b"\x80\x02") and len(globals_used) == 1  # plain pickle.load would call it
    path = write_torch_zip(tmp_path / "evil.pth", payload, {})
    with pytest.raises(CheckpointError, match=r"evil\.pth.*refusing to call"):
        load_state_dict(path, select="model")
    with pytest.raises(CheckpointError, match="refusing to call"):
        load_checkpoint_tree(path)
    assert not PWNED2.exists()


def test_dangerous_global_anywhere_refuses_whole_file(tmp_path: Path) -> None:
    body = dict_(
        {
            "model": dict_({"w": tensor("FloatStorage", "0", 1, (1,), (1,))}),
            "extra": g("os", "system") + tup(s(f"touch {PWNED2}")) + REDUCE,
        }
    )
    path = write_torch_zip(tmp_path / "mixed.pth", pickle_bytes(body), {"0": np.float32([1]).tobytes()})
    PWNED2.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"os\.system"):
        load_state_dict(path, select="model")
    assert not PWNED2.exists()


def test_unknown_classes_become_inert_placeholders(tmp_path: Path) -> None:
    unknown = g("utils.reporter", "Reporter") + tup(s("x")) + REDUCE + tup(i(7)) + REDUCE  # Reporter("x")(7)
    dated = g("datetime", "timedelta") + ints(1, 2) + REDUCE
    body = dict_(
        {
            "model": dict_({"w": tensor("FloatStorage", "0", 2, (2,), (1,))}, ordered=True),
            "reporter": unknown,
            "when": dated,
        }
    )
    path = write_torch_zip(tmp_path / "user.pth", pickle_bytes(body), {"0": np.float32([1, 2]).tobytes()})
    np.testing.assert_array_equal(load_state_dict(path, select="model")["w"], [1, 2])
    tree = load_checkpoint_tree(path)
    assert isinstance(tree["reporter"], Opaque) and tree["reporter"].args == (7,)
    assert tree["reporter"].module == "utils.reporter"
    assert isinstance(tree["when"], Opaque) and tree["when"].args == (1, 2)


def test_build_cannot_alter_the_readers_stand_ins(tmp_path: Path) -> None:
    build = b"b"
    body = dict_({"f": g("torch._utils", "_rebuild_tensor_v2") + dict_({"__defaults__": tup(i(1))}) + build})
    path = write_torch_zip(tmp_path / "build.pth", pickle_bytes(body), {})
    with pytest.raises(CheckpointError, match="BUILD"):
        load_checkpoint_tree(path)
    body = dict_({"t": g("torch", "FloatStorage") + dict_({"x": i(1)}) + build})
    path = write_torch_zip(tmp_path / "build2.pth", pickle_bytes(body), {})
    with pytest.raises(CheckpointError, match="BUILD"):
        load_checkpoint_tree(path)


def test_bare_stand_ins_become_placeholders(tmp_path: Path) -> None:
    body = dict_({"fn": g("torch._utils", "_rebuild_tensor_v2"), "dt": g("torch", "bfloat16")})
    tree = load_checkpoint_tree(write_torch_zip(tmp_path / "bare.pth", pickle_bytes(body), {}))
    assert isinstance(tree["fn"], Opaque) and isinstance(tree["dt"], Opaque)


def test_placeholder_inside_state_dict_is_refused(tmp_path: Path) -> None:
    body = dict_(
        {
            "model": dict_(
                {
                    "w": tensor("FloatStorage", "0", 1, (1,), (1,)),
                    "odd": g("numpy", "float32") + EMPTY_TUPLE + REDUCE,
                    "step": i(3),
                }
            )
        }
    )
    path = write_torch_zip(tmp_path / "odd.pth", pickle_bytes(body), {"0": np.float32([1]).tobytes()})
    reason = r"odd\.pth.*2 non-tensor.*'odd' \(object of numpy\.float32\).*'step'"
    with pytest.raises(CheckpointError, match=reason):
        load_state_dict(path, select="model")


# ----------------------------------------------------------------------------------------------------
# hand-made tensors: dtypes, views, layouts
# ----------------------------------------------------------------------------------------------------


def test_handmade_dtypes_views_and_flat_dict(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float32)
    bf16 = np.float32([1.5, -2.25, 2.0**100])  # bf16-representable
    storages = {
        "f": base.tobytes(),
        "d": np.float64([0.1, 0.2]).tobytes(),
        "h": np.float16([1, 2, 3]).tobytes(),
        "b": (bf16.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
        "i": np.int32([-1, 5]).tobytes(),
        "s": np.int16([-7]).tobytes(),
        "c": np.int8([-3, 4]).tobytes(),
        "u": np.uint8([250]).tobytes(),
        "z": np.bool_([True, False]).tobytes(),
    }
    body = dict_(
        {
            "module.mat": tensor("FloatStorage", "f", 12, (3, 4), (4, 1)),
            "module.matT": tensor("FloatStorage", "f", 12, (4, 3), (1, 4)),
            "module.col": tensor("FloatStorage", "f", 12, (2, 2), (4, 2), offset=5),
            "module.scalar": tensor("FloatStorage", "f", 12, (), (), offset=11),
            "module.empty": tensor("FloatStorage", "f", 12, (0, 3), (3, 1)),
            "module.a.conv_module.d": tensor("DoubleStorage", "d", 2, (2,), (1,)),
            "x.conv_module.module.h": tensor("HalfStorage", "h", 3, (3,), (1,)),
            "bf": tensor("BFloat16Storage", "b", 3, (3,), (1,)),
            "i32": tensor("IntStorage", "i", 2, (2,), (1,)),
            "i16": tensor("ShortStorage", "s", 1, (1,), (1,)),
            "i8": tensor("CharStorage", "c", 2, (2,), (1,)),
            "u8": tensor("ByteStorage", "u", 1, (1,), (1,)),
            "flag": tensor("BoolStorage", "z", 2, (2,), (1,)),
        },
        ordered=True,
    )
    path = write_torch_zip(tmp_path / "flat.pth", pickle_bytes(body), storages, folder="some_name")
    sd = load_state_dict(path)  # select=None: the top level is the state dict
    m = base.reshape(3, 4)
    np.testing.assert_array_equal(sd["mat"], m)
    np.testing.assert_array_equal(sd["matT"], m.T)
    np.testing.assert_array_equal(sd["col"], [[5, 7], [9, 11]])
    assert sd["scalar"].shape == () and sd["scalar"] == 11
    assert sd["empty"].shape == (0, 3)
    assert sd["a.conv_module.d"].dtype == np.float64
    assert sd["x.conv_module.module.h"].dtype == np.float16  # only a *leading* "module." is stripped
    assert sd["bf"].dtype == np.float32
    np.testing.assert_array_equal(sd["bf"], bf16)
    assert [sd[k].dtype for k in ("i32", "i16", "i8", "u8", "flag")] == [
        np.int32,
        np.int16,
        np.int8,
        np.uint8,
        np.bool_,
    ]
    np.testing.assert_array_equal(sd["i8"], [-3, 4])
    np.testing.assert_array_equal(sd["flag"], [True, False])


def test_big_endian_byteorder_record(tmp_path: Path) -> None:
    body = dict_(
        {"w": tensor("FloatStorage", "0", 3, (3,), (1,)), "n": tensor("LongStorage", "1", 1, (), ())}
    )
    storages = {"0": np.array([1, -2, 0.5], ">f4").tobytes(), "1": np.array([99], ">i8").tobytes()}
    path = write_torch_zip(tmp_path / "be.pth", pickle_bytes(body), storages, byteorder="big")
    sd = load_state_dict(path)
    np.testing.assert_array_equal(sd["w"], [1, -2, 0.5])
    assert sd["n"] == 99 and sd["n"].dtype == np.int64


def test_rebuild_tensor_v3_and_parameter(tmp_path: Path) -> None:
    pid = tup(s("storage"), g("torch.storage", "UntypedStorage"), s("0"), s("cpu"), i(8)) + BINPERSID
    v3 = (
        g("torch._utils", "_rebuild_tensor_v3")
        + tup(pid, i(0), ints(2), ints(1), NEWFALSE, dict_({}, ordered=True), g("torch", "float32"))
        + REDUCE
    )
    param = g("torch._utils", "_rebuild_parameter") + tup(v3, NEWFALSE, dict_({}, ordered=True)) + REDUCE
    path = write_torch_zip(
        tmp_path / "v3.pth", pickle_bytes(dict_({"p": param})), {"0": np.float32([4, 5]).tobytes()}
    )
    np.testing.assert_array_equal(load_state_dict(path)["p"], np.float32([4, 5]))


def test_module_prefix_collision_is_refused(tmp_path: Path) -> None:
    body = dict_(
        {
            "module.w": tensor("FloatStorage", "0", 1, (1,), (1,)),
            "w": tensor("FloatStorage", "0", 1, (1,), (1,)),
        }
    )
    path = write_torch_zip(tmp_path / "dup.pth", pickle_bytes(body), {"0": np.float32([1]).tobytes()})
    with pytest.raises(CheckpointError, match="collide"):
        load_state_dict(path)


# ----------------------------------------------------------------------------------------------------
# corrupt torch files
# ----------------------------------------------------------------------------------------------------


def _one_tensor_body(size: tuple = (4,), stride: tuple = (1,), offset: int = 0, numel: int = 4) -> bytes:
    return pickle_bytes(
        dict_({"model": dict_({"w": tensor("FloatStorage", "0", numel, size, stride, offset)})})
    )


@pytest.mark.parametrize(
    ("body", "storages", "reason"),
    [
        (_one_tensor_body(), {}, "missing record 'archive/data/0'"),
        (_one_tensor_body(), {"0": b"\0" * 12}, "shorter than needed"),
        (_one_tensor_body(size=(4,), stride=(2,)), {"0": b"\0" * 16}, "shorter than needed"),
        (_one_tensor_body(size=(2,), offset=3), {"0": b"\0" * 16}, "shorter than needed"),
        (_one_tensor_body(size=(2,), stride=(-1,), offset=3), {"0": b"\0" * 16}, "negative"),
        (b"\x80\x02}q\x00(X", {}, "cannot unpickle"),
        (b"garbage", {}, "cannot unpickle"),
        (pickle_bytes(dict_({"model": tup(s("storage"), s("x")) + BINPERSID})), {}, "persistent id"),
    ],
    ids=[
        "missing-storage",
        "short-storage",
        "stride-out-of-bounds",
        "offset-out-of-bounds",
        "negative-stride",
        "truncated-pickle",
        "garbage-pickle",
        "bad-persistent-id",
    ],
)
def test_corrupt_torch_zip(tmp_path: Path, body: bytes, storages: dict, reason: str) -> None:
    path = write_torch_zip(tmp_path / "bad.pth", body, storages)
    with pytest.raises(CheckpointError, match=rf"bad\.pth.*{reason}"):
        load_state_dict(path, select="model")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file"):
        load_state_dict(tmp_path / "nope.pth")


def test_directory_and_text_and_legacy_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_state_dict(tmp_path)
    text = tmp_path / "notes.checkpoint"
    text.write_text("just some text\n")
    with pytest.raises(CheckpointError, match=r"notes\.checkpoint.*not a PyTorch zip"):
        load_state_dict(text, select="model")
    legacy = tmp_path / "old.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy"):
        load_state_dict(legacy)


def test_truncated_and_incomplete_zips(tmp_path: Path) -> None:
    good = write_torch_zip(
        tmp_path / "good.pth", _one_tensor_body(), {"0": np.float32([1, 2, 3, 4]).tobytes()}
    )
    np.testing.assert_array_equal(load_state_dict(good, select="model")["w"], [1, 2, 3, 4])
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt zip"):
        load_state_dict(cut, select="model")
    nopkl = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(nopkl, "w") as zf:
        zf.writestr("archive/data/0", b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"nopkl\.pth.*data\.pkl"):
        load_state_dict(nopkl)


def test_flipped_tensor_byte_fails_the_crc(tmp_path: Path) -> None:
    """A damaged download (one byte of tensor data changed, the zip index intact) is refused when the tensor
    is read, naming the record, instead of converting a wrong weight."""
    values = np.float32([1, 2, 3, 4]).tobytes()
    good = write_torch_zip(tmp_path / "good.pth", _one_tensor_body(), {"0": values})
    data = good.read_bytes()
    at = data.index(values) + 5
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    tensor = open_state_dict(bad, select="model")["w"]  # names, shapes and bounds need no data
    with pytest.raises(CheckpointError, match=r"flipped\.pth: record 'archive/data/0' is corrupt.*CRC"):
        tensor.read()


def test_non_dict_and_nested_selection(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "list.pth", pickle_bytes(tup(i(1), i(2))), {})
    with pytest.raises(CheckpointError, match="not a dict"):
        load_state_dict(path, select="model")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(path)


# ----------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------


def test_handmade_safetensors(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    bf = np.float32([1.0, -0.5])
    data = w.tobytes() + (bf.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "module.w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "bf": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
    }
    path = write_safetensors(tmp_path / "weights.bin", header, data)  # detected by content, not name
    sd = load_state_dict(path)
    assert set(sd) == {"w", "bf"}
    np.testing.assert_array_equal(sd["w"], w)
    np.testing.assert_array_equal(sd["bf"], bf)
    assert sd["bf"].dtype == np.float32
    assert load_checkpoint_tree(path).keys() == {"module.w", "bf"}
    with pytest.raises(CheckpointError, match="select"):
        load_state_dict(path, select="model")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "bad data_offsets"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "bad data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, "bad data_offsets"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "bad shape"),
        ({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}, "unsupported safetensors dtype"),
        ({"dtype": "F32", "shape": [2]}, "bad safetensors header entry"),
    ],
)
def test_safetensors_bad_entries(tmp_path: Path, entry: dict, reason: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", {"x": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{reason}"):
        load_state_dict(path)


def test_safetensors_bad_header(tmp_path: Path) -> None:
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 6) + b"{oops}" + b"\0" * 4)
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_state_dict(bad_json)
    too_long = tmp_path / "long.safetensors"
    too_long.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint or a safetensors file"):
        load_state_dict(too_long)
    truncated = tmp_path / "short.safetensors"
    write_safetensors(truncated, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    truncated.write_bytes(truncated.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="bad data_offsets"):
        load_state_dict(truncated)


def test_open_state_dict_reads_only_the_tensors_asked_for(shared_dir, monkeypatch):
    """The release reader's lazy state dict: names, shapes and dtypes without data; values equal to the eager
    reader's; converting one component reads only that component's kept keys (dropped ones never)."""
    from almtok_jax.config import load_model_config
    from almtok_jax.experts.fusion import FUSION
    from almtok_jax.weights.torch_io import LazyTensor, load_state_dict, open_state_dict

    path = shared_dir / "fixtures/release_tiny/ep5.checkpoint"
    reads: list[tuple[int, ...]] = []
    original = LazyTensor.read
    monkeypatch.setattr(LazyTensor, "read", lambda self: reads.append(self.shape) or original(self))
    eager = load_state_dict(path, select="model")
    reads.clear()
    lazy = open_state_dict(path, select="model")
    assert list(lazy) == list(eager) and not reads
    assert all(lazy[k].shape == eager[k].shape and lazy[k].dtype == eager[k].dtype for k in eager)
    fusion_keys = [k for k in lazy if FUSION.owns(k)]
    FUSION.load(lazy, FUSION.config(load_model_config("tiny_release")))
    assert len(reads) == len(fusion_keys) > 0
    reads.clear()
    for k in ("pretrained_model.model.model.quantizer_melspec_2048.codebook", "whisper_encoder.conv1.weight"):
        np.testing.assert_array_equal(np.asarray(lazy[k]), eager[k])
    assert len(reads) == 2
