"""Token records: the shards ``almtok-tokenize`` writes (:mod:`almtok_jax.cli.tokenize`) and their readers.

A shard ``shard-KKKKK-of-NNNNN.array_record`` holds one record per encoded file (:func:`encode_record`: JSON
header + raw little-endian codes ``(Q, T)``, or ``(C, Q, T)`` per channel; int16 when the codebook fits); it is
complete once its ``.json`` beside it exists. Read them back with :func:`open_records` / :func:`codes_dataset`
(grain ``MapDataset``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import grain
import numpy as np

from almtok_jax.tokenizer import TOKEN_OFFSET, flatten

RECORD_MAGIC = b"ALMTOK1\n"
CODE_DTYPES = ("<i2", "<i4")
SHARD_SUFFIX = ".array_record"


def code_dtype(codebook_size: int) -> str:
    """Little-endian int16 when every code fits, else int32."""
    return "<i2" if codebook_size <= 2 ** 15 else "<i4"


def encode_record(codes: np.ndarray, meta: dict) -> bytes:
    """``codes`` (int, any shape) + JSON-serialisable ``meta`` -> record bytes:
    ``RECORD_MAGIC``, uint32 header length, UTF-8 JSON header (meta + ``shape``, ``dtype``), raw codes."""
    codes = np.ascontiguousarray(codes)
    if codes.dtype.str not in CODE_DTYPES:
        raise ValueError(f"codes must be one of {CODE_DTYPES}, got {codes.dtype.str}")
    header = json.dumps({**meta, "shape": list(codes.shape), "dtype": codes.dtype.str}, sort_keys=True).encode()
    return RECORD_MAGIC + struct.pack("<I", len(header)) + header + codes.tobytes()


def decode_record(data: bytes) -> dict:
    """Inverse of :func:`encode_record`: the header's fields plus ``codes`` (int32 array)."""
    data = bytes(data)
    if not data.startswith(RECORD_MAGIC):
        raise ValueError("not an almtok-jax token record (bad magic)")
    start = len(RECORD_MAGIC) + 4
    (size,) = struct.unpack("<I", data[len(RECORD_MAGIC): start])
    header = json.loads(data[start: start + size])
    if header.get("dtype") not in CODE_DTYPES:
        raise ValueError(f"token record: codes dtype must be one of {CODE_DTYPES}, got {header.get('dtype')!r}")
    shape = tuple(int(s) for s in header.pop("shape"))
    body = data[start + size:]
    expected = int(np.prod(shape)) * np.dtype(header["dtype"]).itemsize
    if len(body) != expected:
        raise ValueError(f"token record {header.get('path')}: {len(body)} bytes of codes, expected {expected}")
    codes = np.frombuffer(body, header.pop("dtype")).reshape(shape).astype(np.int32)
    return {**header, "codes": codes}


def shard_paths(out: str | Path) -> list[Path]:
    """The complete shards of an output folder (those with their ``.json``), in shard order."""
    out = Path(out)
    return sorted(p for p in out.glob(f"shard-*{SHARD_SUFFIX}") if p.with_suffix(".json").is_file())


def open_records(out: str | Path) -> grain.MapDataset:
    """grain ``MapDataset`` of the decoded records (:func:`decode_record` dicts) of every complete shard."""
    paths = shard_paths(out)
    if not paths:
        raise FileNotFoundError(f"{out}: no complete token shards (shard-*{SHARD_SUFFIX} with its .json)")
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([str(p) for p in paths])).map(decode_record)


def codes_dataset(out: str | Path, tokens: bool = False, offset: int | None = None) -> grain.MapDataset:
    """Codes ``(Q, T)`` (``(C, Q, T)`` per channel) per file, or with ``tokens=True`` the flat LM tokens
    ``(T * Q,)`` of :func:`almtok_jax.tokenizer.flatten` (``(C, T * Q)`` per channel; ``offset`` defaults
    to ``TOKEN_OFFSET``)."""

    offset = TOKEN_OFFSET if offset is None else offset
    records = open_records(out)
    if not tokens:
        return records.map(lambda r: r["codes"])

    def to_tokens(r: dict) -> np.ndarray:
        codes = r["codes"]
        return flatten(codes, offset) if codes.ndim == 2 else np.stack([flatten(c, offset) for c in codes])

    return records.map(to_tokens)
