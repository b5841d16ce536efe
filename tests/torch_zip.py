"""Writing torch-like checkpoints by hand (no torch needed): a tiny protocol-2 pickle writer and the
``torch.save`` zip layout (``<archive>/data.pkl``, ``byteorder``, ``data/<key>``, ``version``), shared by the
reader tests, the conversion memory test and ``benchmarks/bench_convert.py``."""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

MARK = b"("
TUPLE = b"t"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
SETITEM = b"s"
REDUCE = b"R"
BINPERSID = b"Q"
NEWFALSE = b"\x89"


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def tup(*parts: bytes) -> bytes:
    return MARK + b"".join(parts) + TUPLE


def ints(*values: int) -> bytes:
    return tup(*(i(v) for v in values))


def dict_(items: dict[str, bytes], ordered: bool = False) -> bytes:
    head = g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE if ordered else EMPTY_DICT
    return head + b"".join(s(k) + v + SETITEM for k, v in items.items())


def tensor(storage: str, key: str, numel: int, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    """``_rebuild_tensor_v2((storage pid), offset, size, stride, False, OrderedDict())``."""
    pid = tup(s("storage"), g("torch", storage), s(key), s("cpu"), i(numel)) + BINPERSID
    return (
        g("torch._utils", "_rebuild_tensor_v2")
        + tup(pid, i(offset), ints(*size), ints(*stride), NEWFALSE, dict_({}, ordered=True))
        + REDUCE
    )


def pickle_bytes(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def write_torch_zip(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes],
    byteorder: str | None = "little",
    folder: str = "archive",
) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{folder}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{folder}/data/{key}", raw)
        zf.writestr(f"{folder}/version", "3\n")
    return path


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def write_reference_checkpoint(path: Path, entries: Mapping[str, Mapping[str, tuple[int, ...]]],
                               values: Callable[[str, tuple[int, ...]], np.ndarray]) -> int:
    """A ``torch.save`` zip of a dict of state dicts (``{"model": {name: shape}, "optimizer": ...}``), one
    storage per tensor, written one tensor at a time (``values(name, shape)`` makes each: float32, or
    int64 for ``num_batches_tracked``). Returns the bytes of tensor data written."""
    body, total, key = {}, 0, 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for section, shapes in entries.items():
            items = {}
            for name, shape in shapes.items():
                array = np.ascontiguousarray(values(name, tuple(shape)))
                storage = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}[array.dtype]
                stride = tuple(s // array.itemsize for s in array.strides)
                items[name] = tensor(storage, str(key), array.size, array.shape, stride)
                with zf.open(f"archive/data/{key}", "w", force_zip64=True) as f:
                    f.write(array.data)
                total, key = total + array.nbytes, key + 1
            body[section] = dict_(items, ordered=True)
        zf.writestr("archive/data.pkl", pickle_bytes(dict_(body)))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return total
