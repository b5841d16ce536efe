"""Safe, torch-free reader for PyTorch checkpoints (``torch.save`` zip format) and safetensors files.

Nothing stored in a checkpoint is ever executed.  The pickle inside a ``torch.save`` zip is read by a
restricted :class:`pickle.Unpickler` whose ``find_class`` only ever returns this module's own inert
stand-ins:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_tensor_v3`` /
  ``_rebuild_parameter`` / ``_rebuild_parameter_with_state`` build lazy tensor references;
* ``torch.<X>Storage`` / ``torch.storage.UntypedStorage`` and ``torch.<dtype>`` are dtype markers,
  the storages themselves come from ``persistent_load`` (``('storage', type, key, location, numel)``);
* ``collections.OrderedDict`` becomes an insertion-ordered ``dict`` (the ``_metadata`` that PyTorch
  attaches with BUILD is dropped), ``torch.Size`` a ``tuple``;
* a tiny allow-list of builtins (``set``, ``frozenset``, ``slice``, ``complex``) and a restricted
  ``_codecs.encode`` (latin-1 only, used by protocol 2 to store ``bytes``);
* a known-dangerous global (``os.*``, ``posix.*``, ``subprocess.*``, ``builtins.eval`` / ``exec`` /
  ``getattr`` / ``__import__``, ...) makes the whole load fail with :class:`CheckpointError`;
* anything else (user classes, numpy scalars, ``datetime`` ...) becomes an :class:`Opaque`
  placeholder that records its name, arguments and state and never calls anything.

A dangerous global is refused wherever it sits in the pickle (also inside an entry that ``select``
would skip): such a file is treated as malicious as a whole.  Each unknown global gets its own
:class:`Opaque` subclass (test with ``isinstance(x, Opaque)``; read ``x.module``, ``x.name``,
``x.args``, ``x.kwargs``, ``x.state``, ``x.items``).  Tensor views are bounds-checked against their
storage before ``as_strided`` and always returned as fresh C-contiguous, writeable copies.

Tensor data is read lazily: :func:`load_state_dict` only reads the storage records that the selected
state dict uses, each one once, and frees it as soon as the last tensor viewing it has been copied.

Public API
----------
``load_state_dict(path, select=None) -> dict[str, np.ndarray]``
    A flat state dict. ``select`` picks a sub-dict of the top-level dict (``"model"`` for the release's
    ``ep5.checkpoint``, ``"codec_model"`` for ``sqcodec.pth``).  With ``select=None`` the top-level
    object itself must be a flat dict of tensors; a dict holding sub-dicts (a training checkpoint)
    is refused with a :class:`CheckpointError` that suggests the candidate names.  Every value of the
    selected dict must be a tensor: non-tensor entries are refused (listed in the error), not skipped,
    so that a converter never silently loses a weight.  A leading ``module.`` is stripped from every
    key (only a leading one).  bfloat16 tensors are returned as float32 (exact); every other dtype is
    kept (float16 stays float16, int64 stays int64, ...).  Safetensors files are flat: ``select`` must
    be ``None`` for them.
``load_checkpoint_tree(path) -> object``
    The whole rebuilt object tree (dicts, lists, tuples, scalars, strings, ``np.ndarray`` tensors and
    :class:`Opaque` placeholders), e.g. to inspect optimizer or scheduler entries.  Keys are left as
    stored (no ``module.`` stripping).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "Opaque",
    "load_checkpoint_tree",
    "load_state_dict",
]

MODULE_PREFIX = "module."
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file could not be read safely; the message names the file and the reason."""


def _fail(path: Path | str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}")


# ----------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DType:
    """A tensor element type: the numpy code of its stored bytes and whether they hold bfloat16."""

    name: str
    code: str  # numpy type code without byte order, e.g. "f4"
    bf16: bool = False

    @property
    def itemsize(self) -> int:
        return np.dtype(self.code).itemsize


_DTYPES: dict[str, _DType] = {
    d.name: d
    for d in (
        _DType("float32", "f4"),
        _DType("float64", "f8"),
        _DType("float16", "f2"),
        _DType("bfloat16", "u2", bf16=True),
        _DType("int64", "i8"),
        _DType("int32", "i4"),
        _DType("int16", "i2"),
        _DType("int8", "i1"),
        _DType("uint8", "u1"),
        _DType("bool", "b1"),
        _DType("complex64", "c8"),
        _DType("complex128", "c16"),
    )
}

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}

_TORCH_DTYPE_ALIASES: dict[str, str] = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only carries the element type."""

    dtype: _DType
    untyped: bool = False

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a storage type is not allowed")


@dataclass(frozen=True)
class _TorchDType:
    """Stand-in for a ``torch.float32``-like dtype object (used by ``_rebuild_tensor_v3``)."""

    dtype: _DType

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a dtype is not allowed")


# ----------------------------------------------------------------------------------------------------
# inert placeholders and safe stand-ins
# ----------------------------------------------------------------------------------------------------


class Opaque:
    """Inert placeholder for an object of an unknown class or the result of calling an unknown global.

    ``module`` and ``name`` name the global; ``args`` / ``kwargs`` are what the pickle passed to it,
    ``state`` what BUILD set, ``items`` what APPENDS/SETITEMS added.  Calling an instance (REDUCE on a
    placeholder result) returns another placeholder; nothing is ever executed.
    """

    module: str = "?"
    name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return _opaque_class(self.module, f"{self.name}()")(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    @property
    def qualified_name(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"Opaque({self.qualified_name}, args={self.args!r}, state={self.state!r})"


def _opaque_class(module: str, name: str) -> type[Opaque]:
    """A fresh :class:`Opaque` subclass standing for the global ``module.name`` (never imported)."""
    return type("Opaque", (Opaque,), {"module": module, "name": name, "__module__": __name__})


class _StateDict(dict):
    """Stand-in for ``collections.OrderedDict``; BUILD state (PyTorch's ``_metadata``) is ignored."""

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_size(*args: Any) -> tuple:
    return tuple(*args)


def _codecs_encode(text: Any, encoding: str = "utf-8", *_: Any) -> bytes:
    """Restricted ``_codecs.encode``: protocol 2 stores ``bytes`` as ``encode(latin1_text, 'latin1')``."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin-1")


@dataclass
class _Storage:
    """A storage record of the zip (``<prefix>data/<key>``), not read yet."""

    key: str
    dtype: _DType
    numel: int
    untyped: bool


@dataclass
class _TensorRef:
    """A tensor to be built from a storage: offset, size and stride are in elements of ``dtype``."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: _DType


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise pickle.UnpicklingError(f"bad tensor {what}: {value!r}")
    return tuple(value)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None = None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not a storage record")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise pickle.UnpicklingError(f"bad tensor storage offset: {offset!r}")
    size_t, stride_t = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise pickle.UnpicklingError(f"tensor size {size_t} and stride {stride_t} differ in length")
    return _TensorRef(storage, offset, size_t, stride_t, dtype or storage.dtype)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    if not isinstance(dtype, _TorchDType):
        raise pickle.UnpicklingError(f"unsupported tensor dtype {dtype!r}")
    return _tensor_ref(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *_: Any) -> Any:
    return data


class _SafeCallable:
    """Immutable wrapper of one of this module's stand-in functions, as handed to the unpickler.

    Wrapping keeps a pickle from altering the module's own functions (BUILD would otherwise set
    attributes such as ``__defaults__`` on them).
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD on {self._fn.__name__} is not allowed")


_TORCH_UTILS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}

_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}

_DANGEROUS_MODULES = frozenset(
    "os posix nt subprocess _posixsubprocess sys shutil socket importlib runpy pty commands webbrowser "
    "ctypes multiprocessing code codeop pickle _pickle marshal types signal pdb asyncio threading "
    "_thread operator".split()
)
_DANGEROUS_BUILTINS = frozenset(
    "eval exec compile __import__ getattr setattr delattr open globals locals vars input "
    "breakpoint apply execfile file reload help exit quit memoryview __loader__ __build_class__".split()
)


def _is_dangerous(module: str, name: str) -> bool:
    top = module.split(".", 1)[0]
    if top in _DANGEROUS_MODULES:
        return True
    return top in ("builtins", "__builtin__") and name in _DANGEROUS_BUILTINS


def _resolve_global(module: str, name: str) -> Any:
    """The safe stand-in for global ``module.name`` (None if there is none)."""
    if module == "torch._utils":
        fn = _TORCH_UTILS.get(name)
        return None if fn is None else _SafeCallable(fn)
    if module == "collections" and name == "OrderedDict":
        return _StateDict
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(_DTYPES[_STORAGE_DTYPES[name]], untyped=name == "UntypedStorage")
    if module == "torch" and name == "Size":
        return _SafeCallable(_torch_size)
    if module == "torch" and _TORCH_DTYPE_ALIASES.get(name, name) in _DTYPES:
        return _TorchDType(_DTYPES[_TORCH_DTYPE_ALIASES.get(name, name)])
    if module in ("builtins", "__builtin__"):
        return _SAFE_BUILTINS.get(name)
    if module == "_codecs" and name == "encode":
        return _SafeCallable(_codecs_encode)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only ever hands out this module's inert stand-ins."""

    def __init__(self, file: io.BytesIO, source: Path) -> None:
        super().__init__(file)
        self._source = source
        self._opaque_classes: dict[tuple[str, str], type[Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if _is_dangerous(module, name):
            raise _fail(
                self._source,
                f"refusing to call {module}.{name}: the pickle asks for a dangerous "
                "global (possible malicious checkpoint); nothing was executed",
            )
        safe = _resolve_global(module, name)
        if safe is not None:
            return safe
        key = (module, name)
        if key not in self._opaque_classes:
            self._opaque_classes[key] = _opaque_class(module, name)
        return self._opaque_classes[key]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage record id {pid!r}")
        return _Storage(key, storage_type.dtype, numel, storage_type.untyped)


# ----------------------------------------------------------------------------------------------------
# torch zip archives
# ----------------------------------------------------------------------------------------------------


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The archive's top folder (``'<name>/'``), found from its ``data.pkl`` record."""
    names = zf.namelist()
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not candidates and "data.pkl" in names:
        candidates = [""]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(c + "data.pkl" for c in candidates)
        raise _fail(
            path, f"not a torch.save zip checkpoint: expected one '<archive>/data.pkl' record, found {found}"
        )
    return candidates[0]


def _read_record(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise _fail(path, f"missing record '{name}' in the zip (truncated or corrupt checkpoint)") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise _fail(path, f"cannot read record '{name}' (corrupt checkpoint): {exc}") from exc


def _byte_order(zf: zipfile.ZipFile, prefix: str, path: Path) -> str:
    """``'<'`` or ``'>'`` from the ``byteorder`` record (little-endian when absent, as PyTorch assumes)."""
    name = prefix + "byteorder"
    if name not in zf.namelist():
        return "<"
    value = _read_record(zf, name, path).decode("ascii", "replace").strip()
    if value not in ("little", "big"):
        raise _fail(path, f"unknown byteorder record {value!r}")
    return "<" if value == "little" else ">"


def _unpickle(data: bytes, path: Path) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        UnicodeDecodeError,
        struct.error,
    ) as exc:
        raise _fail(path, f"cannot unpickle data.pkl: {type(exc).__name__}: {exc}") from exc


def _check_bounds(ref: _TensorRef, available: int, path: Path) -> None:
    """Refuse a tensor whose view would reach outside its storage (``available`` elements)."""
    if any(s < 0 for s in ref.size) or ref.offset < 0 or any(s < 0 for s in ref.stride):
        raise _fail(path, f"storage '{ref.storage.key}': negative size, stride or offset in tensor view")
    if 0 in ref.size:
        return
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= available:
        raise _fail(
            path,
            f"storage '{ref.storage.key}' is shorter than needed: tensor of size {ref.size} "
            f"stride {ref.stride} offset {ref.offset} needs {last + 1} elements, "
            f"storage holds {available}",
        )


def _finish_dtype(array: np.ndarray, dtype: _DType) -> np.ndarray:
    """Native byte order; bfloat16 bit patterns widened to float32 (exact)."""
    if dtype.bf16:
        wide = array.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return array.astype(np.dtype(dtype.code), copy=False)


def _result_dtype(dtype: _DType) -> np.dtype:
    """The dtype a tensor of ``dtype`` is returned as (bfloat16 as float32)."""
    return np.dtype(np.float32) if dtype.bf16 else np.dtype(dtype.code)


@dataclass(frozen=True)
class _Record:
    """Where a storage record's bytes lie: at ``offset`` in the file when stored uncompressed (as
    ``torch.save`` and safetensors write them), else in the zip member ``name`` (read whole and
    decompressed, which checks its CRC).  ``order`` is the byte order of its values (``'<'`` or ``'>'``).
    A stored zip member also has its ``crc`` and ``size``: a read of the whole record is checked against
    its CRC-32, as a read through ``zipfile`` would be."""

    path: Path
    order: str
    offset: int | None = None
    name: str | None = None
    crc: int | None = None
    size: int | None = None

    def read(self, begin: int, end: int) -> np.ndarray:
        """Bytes ``[begin, end)`` of the record as a fresh, writeable ``uint8`` array."""
        if self.offset is None:
            with zipfile.ZipFile(self.path) as zf:
                return np.frombuffer(_read_record(zf, self.name, self.path), np.uint8)[begin:end].copy()
        out = np.empty(end - begin, np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset + begin)
                got = f.readinto(memoryview(out))
        except OSError as exc:
            raise _fail(self.path, f"cannot read tensor data: {exc}") from exc
        if got != out.size:
            raise _fail(self.path, "tensor data is truncated (the file is shorter than its index says)")
        if self.crc is not None and (begin, end) == (0, self.size) and zlib.crc32(out) != self.crc:
            raise _fail(self.path, f"record '{self.name}' is corrupt: its bytes do not match the zip's CRC-32")
        return out


class LazyTensor:
    """A tensor of a checkpoint whose data is read only when asked for (:meth:`read`, ``np.asarray``).

    ``shape`` and ``dtype`` (the dtype :meth:`read` returns: bfloat16 as float32) are known without
    reading anything. Each read returns a fresh C-contiguous, writeable array and keeps nothing, so
    holding a mapping of these costs no tensor memory.
    """

    __slots__ = ("_dtype", "_offset", "_record", "_stride", "shape")

    def __init__(self, record: _Record, dtype: _DType, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self._record, self._dtype, self._offset, self._stride = record, dtype, offset, stride
        self.shape = shape

    @property
    def dtype(self) -> np.dtype:
        return _result_dtype(self._dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor's values (only the bytes it views are read from the file)."""
        item = self._dtype
        if 0 in self.shape:
            return np.empty(self.shape, _result_dtype(item))
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self._stride, strict=True))
        stored = self._record.read(self._offset * item.itemsize, (self._offset + span) * item.itemsize)
        stored = stored.view(self._record.order + item.code if item.itemsize > 1 else item.code)
        if span == stored.size == int(np.prod(self.shape)) and self._stride == _c_strides(self.shape):
            array = stored.reshape(self.shape)
        else:
            strides = tuple(s * item.itemsize for s in self._stride)
            view = np.lib.stride_tricks.as_strided(stored, self.shape, strides, writeable=False)
            array = np.array(view, order="C")
        return _finish_dtype(array, item)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _marker_placeholder(obj: Any) -> Opaque:
    """A bare stand-in left in the tree (a storage, dtype or function never applied) as a placeholder."""
    if isinstance(obj, _SafeCallable):
        return _opaque_class("almtok_jax.weights.torch_io", obj._fn.__name__)()
    return _opaque_class("torch", type(obj).__name__.lstrip("_"))(obj)


@dataclass
class _Materializer:
    """Replaces every ``_TensorRef`` of a tree by its ``np.ndarray`` and OrderedDicts by plain dicts."""

    tensor: Callable[[_TensorRef], np.ndarray]
    memo: dict[int, Any] = field(default_factory=dict)

    def __call__(self, obj: Any) -> Any:
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        if isinstance(obj, _TensorRef):
            out: Any = self.tensor(obj)
        elif isinstance(obj, dict):
            out = {}
            self.memo[id(obj)] = out
            for k, v in obj.items():
                out[self(k)] = self(v)
        elif isinstance(obj, list):
            out = []
            self.memo[id(obj)] = out
            out.extend(self(v) for v in obj)
        elif isinstance(obj, tuple):
            out = tuple(self(v) for v in obj)
        elif isinstance(obj, Opaque):
            out = obj
            self.memo[id(obj)] = out
            obj.args = self(obj.args)
            obj.kwargs = self(obj.kwargs)
            obj.state = self(obj.state)
            obj.items = self(obj.items)
        elif isinstance(obj, _Storage | _StorageType | _TorchDType | _SafeCallable):
            out = _marker_placeholder(obj)
        else:
            out = obj
        self.memo[id(obj)] = out
        return out


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


@dataclass
class _TorchArchive:
    """An open ``torch.save`` zip: the unpickled tree (tensors as ``_TensorRef``) and its records."""

    zf: zipfile.ZipFile
    prefix: str
    order: str
    tree: Any
    path: Path
    records: dict[str, tuple[_Record, int]] = field(default_factory=dict)

    def _record(self, key: str) -> tuple[_Record, int]:
        """The storage record ``key`` and its size in bytes (from the zip index, nothing read)."""
        if key not in self.records:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                reason = f"missing record '{name}' in the zip (truncated or corrupt checkpoint)"
                raise _fail(self.path, reason) from None
            if info.compress_type != zipfile.ZIP_STORED:
                self.records[key] = _Record(self.path, self.order, name=name), info.file_size
            else:
                self.zf.fp.seek(info.header_offset)
                signature, name_len, extra_len = _LOCAL_HEADER.unpack(self.zf.fp.read(_LOCAL_HEADER.size))
                if signature != b"PK\x03\x04":
                    raise _fail(self.path, f"bad local header of record '{name}' (corrupt checkpoint)")
                offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                self.records[key] = _Record(self.path, self.order, offset=offset, name=name,
                                            crc=info.CRC, size=info.file_size), info.file_size
        return self.records[key]

    def lazy(self, ref: _TensorRef) -> LazyTensor:
        """A checked, unread tensor: its record exists, is long enough, and holds the whole view."""
        record, size = self._record(ref.storage.key)
        nbytes = ref.storage.numel * (1 if ref.storage.untyped else ref.storage.dtype.itemsize)
        if size < nbytes:
            raise _fail(
                self.path, f"storage '{ref.storage.key}' is shorter than needed: {size} bytes, expected {nbytes}"
            )
        _check_bounds(ref, nbytes // ref.dtype.itemsize, self.path)
        return LazyTensor(record, ref.dtype, ref.offset, ref.size, ref.stride)

    def materialize(self, obj: Any) -> Any:
        try:
            return _Materializer(lambda ref: self.lazy(ref).read())(obj)
        except RecursionError as exc:
            raise _fail(self.path, "object tree is nested too deeply") from exc


def _open_torch_zip(path: Path) -> _TorchArchive:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _fail(path, f"truncated or corrupt zip checkpoint: {exc}") from exc
    try:
        prefix = _archive_prefix(zf, path)
        order = _byte_order(zf, prefix, path)
        tree = _unpickle(_read_record(zf, prefix + "data.pkl", path), path)
    except BaseException:
        zf.close()
        raise
    return _TorchArchive(zf, prefix, order, tree, path)


# ----------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors_header(path: Path, file_size: int, head: bytes) -> tuple[dict[str, Any], int] | None:
    """The parsed JSON header and the data start, or None if ``head`` is not a safetensors header."""
    if len(head) < 9:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > _SAFETENSORS_MAX_HEADER or 8 + n > file_size or head[8:9] != b"{":
        return None
    with open(path, "rb") as f:
        f.seek(8)
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"bad safetensors header (invalid JSON): {exc}") from exc
    if not isinstance(header, dict):
        raise _fail(path, "bad safetensors header: not a JSON object")
    return header, 8 + n


def _safetensors_entry(
    path: Path, name: str, info: Any, data_size: int
) -> tuple[_DType, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise _fail(path, f"bad safetensors header entry for '{name}': {info!r}")
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise _fail(path, f"unsupported safetensors dtype {info['dtype']!r} for '{name}'")
    dtype = _DTYPES[_SAFETENSORS_DTYPES[info["dtype"]]]
    shape, offsets = info["shape"], info["data_offsets"]
    ints = (isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets])
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 or not all(ints):
        raise _fail(path, f"bad shape or data_offsets for '{name}': {shape!r}, {offsets!r}")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not begin <= end <= data_size or end - begin != expected:
        raise _fail(
            path,
            f"bad data_offsets {offsets} for '{name}' (shape {shape}, {info['dtype']}): "
            f"need {expected} bytes within a data section of {data_size} bytes",
        )
    return dtype, tuple(shape), begin, end


def _safetensors_tensors(path: Path, header: dict[str, Any], start: int, file_size: int) -> dict[str, LazyTensor]:
    """The header's entries as unread tensors (every entry checked against the data section first)."""
    data_size = file_size - start
    entries = {k: _safetensors_entry(path, k, v, data_size) for k, v in header.items() if k != "__metadata__"}
    return {
        name: LazyTensor(_Record(path, "<", offset=start + begin), dtype, 0, shape, _c_strides(shape))
        for name, (dtype, shape, begin, _end) in entries.items()
    }


# ----------------------------------------------------------------------------------------------------
# format detection and public API
# ----------------------------------------------------------------------------------------------------


def _detect(path: Path) -> tuple[str, Any]:
    """``('zip', None)`` or ``('safetensors', (header, start, size))``; raises for anything else."""
    if not path.exists():
        raise _fail(path, "no such file")
    if not path.is_file():
        raise _fail(path, "not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise _fail(path, f"cannot read file: {exc}") from exc
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip", None
    parsed = _safetensors_header(path, size, head)
    if parsed is not None:
        return "safetensors", (parsed[0], parsed[1], size)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _fail(
            path,
            "legacy (pre-1.6, non-zip) torch.save format is not supported; "
            "re-save it with a current PyTorch or convert it to safetensors",
        )
    raise _fail(path, "not a PyTorch zip checkpoint or a safetensors file (unrecognized content)")


def _describe(value: Any) -> str:
    if isinstance(value, Opaque):
        return f"object of {value.qualified_name}"
    return type(value).__name__


def _strip_prefix(keys: list[str]) -> list[str]:
    return [k[len(MODULE_PREFIX) :] if k.startswith(MODULE_PREFIX) else k for k in keys]


def _select(tree: Any, select: str | None, path: Path) -> Any:
    """The object that should be a flat state dict: ``tree[select]`` or the tree itself."""
    if select is None:
        if isinstance(tree, dict):
            nested = [
                k
                for k, v in tree.items()
                if isinstance(v, dict) and any(isinstance(x, _TensorRef) for x in v.values())
            ]
            if nested:
                raise _fail(
                    path,
                    f"the top-level dict holds sub-dicts of tensors {nested!r} (keys: "
                    f"{list(tree)!r}); pass select=, e.g. select={nested[0]!r}",
                )
        return tree
    if not isinstance(tree, dict):
        raise _fail(
            path, f"select={select!r} given but the top-level object is a {_describe(tree)}, not a dict"
        )
    if select not in tree:
        raise _fail(path, f"no entry {select!r} at top level; available top-level keys: {list(tree)!r}")
    return tree[select]


def _check_state_dict(obj: Any, path: Path, where: str) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict):
        raise _fail(path, f"{where} is a {_describe(obj)}, not a state dict")
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise _fail(path, f"{where} has non-string keys: {bad_keys[:10]!r}")
    bad = [f"{k!r} ({_describe(v)})" for k, v in obj.items() if not isinstance(v, _TensorRef)]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise _fail(path, f"{where} holds {len(bad)} non-tensor value(s): {', '.join(bad[:10])}{more}")
    return obj


def load_checkpoint_tree(path: str | os.PathLike[str]) -> Any:
    """Rebuild the whole object tree of a checkpoint without executing anything.

    Returns dicts (OrderedDicts become plain insertion-ordered dicts), lists, tuples, sets, scalars,
    strings, bytes, ``np.ndarray`` for tensors (bfloat16 as float32) and :class:`Opaque` placeholders
    for objects of any other class.  A safetensors file gives its flat dict of arrays.  Raises
    :class:`CheckpointError` for unreadable, corrupt or malicious files.
    """
    p = Path(path)
    kind, info = _detect(p)
    if kind == "safetensors":
        return {k: v.read() for k, v in _safetensors_tensors(p, *info).items()}
    archive = _open_torch_zip(p)
    with archive.zf:
        return archive.materialize(archive.tree)


def open_state_dict(path: str | os.PathLike[str], select: str | None = None) -> dict[str, LazyTensor]:
    """A flat ``name -> LazyTensor`` state dict of a ``torch.save`` zip or a safetensors file, unread.

    Names, shapes and dtypes come from the pickle or header alone; each tensor's bytes are read from
    the file only when it is asked for (``np.asarray(t)`` or ``t.read()``), so a converter holds one
    tensor at a time and never reads the ones it drops.  Everything that can be checked without the
    data is checked here: the selection (as :func:`load_state_dict`), every storage record's presence
    and length, every view's bounds.  The file must stay in place while the tensors are used.
    """
    p = Path(path)
    kind, info = _detect(p)
    if kind == "safetensors":
        if select is not None:
            raise _fail(p, f"select={select!r} given, but a safetensors file holds one flat dict")
        tensors = _safetensors_tensors(p, *info)
    else:
        archive = _open_torch_zip(p)
        with archive.zf:
            where = "the top-level object" if select is None else f"entry {select!r}"
            refs = _check_state_dict(_select(archive.tree, select, p), p, where)
            tensors = {k: archive.lazy(ref) for k, ref in refs.items()}
    names = _strip_prefix(list(tensors))
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise _fail(p, f"keys collide after stripping a leading {MODULE_PREFIX!r}: {dup[:10]!r}")
    return dict(zip(names, tensors.values(), strict=True))


def load_state_dict(path: str | os.PathLike[str], select: str | None = None) -> dict[str, np.ndarray]:
    """Read a flat ``name -> np.ndarray`` state dict from a ``torch.save`` zip or a safetensors file.

    ``select`` picks a sub-dict of the top-level dict (``"model"``, ``"codec_model"``); ``None`` needs
    the top-level object to be the state dict itself.  Other top-level entries (optimizer, scheduler,
    arbitrary user objects) are never read beyond the pickle and may hold anything inert.  Every value
    of the selected dict must be a tensor (else :class:`CheckpointError` listing the offenders).  A
    leading ``module.`` is stripped from each key.  bfloat16 becomes float32; other dtypes are kept.
    Everything is read at once: :func:`open_state_dict` reads tensors one by one instead.
    """
    return {name: tensor.read() for name, tensor in open_state_dict(path, select).items()}
