"""Declarative mapping from reference (PyTorch) state-dict keys to Flax variable paths.

Each model module owns a list of :class:`Rule` next to its definition. A rule matches a whole key with a
regular expression; its named groups fill the ``{group}`` placeholders of the target path, whose first
element is the Flax collection (``params/...``, ``batch_stats/...``, ``codebook/...``). A rule with
``target=None`` drops the key on purpose (unused buffers, training-only heads). ``stack="i"`` stacks the
arrays of every value of group ``i`` along a new leading axis, in index order, for layers run by
``nn.scan``. :func:`convert_state_dict` applies the first matching rule to every key and reports every
missing, unexpected and wrongly shaped tensor at once. Every check runs on shapes alone (each transform
evaluated on shapes with ``jax.eval_shape``), before any value is read: a state dict of
``jax.ShapeDtypeStruct`` (a full-size check without weights) goes through the same rules, and a state dict
of lazily read tensors can be converted one variable at a time (:class:`LazyVariable`), which is how a
release is converted in bounded memory.

Keys are canonicalised first, so both weight-norm spellings (``weight_g``/``weight_v`` and
``parametrizations.weight.original0``/``original1``) match rules written with ``weight_g``/``weight_v``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]


class MappingError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped tensor."""


def identity(a: np.ndarray) -> np.ndarray:
    return a


def linear(a: np.ndarray) -> np.ndarray:
    """torch Linear ``(out, in)`` -> Flax ``(in, out)``."""
    return a.T


def conv1d(a: np.ndarray) -> np.ndarray:
    """torch Conv1d ``(out, in/groups, k)`` -> ``(k, in/groups, out)``."""
    return a.transpose(2, 1, 0)


def conv_transpose1d(a: np.ndarray) -> np.ndarray:
    """torch ConvTranspose1d ``(in, out, k)`` -> ``(k, in, out)`` (not flipped)."""
    return a.transpose(2, 0, 1)


def conv2d(a: np.ndarray) -> np.ndarray:
    """torch Conv2d ``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``."""
    return a.transpose(2, 3, 1, 0)


def pointwise_conv(a: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv1d ``(out, in, 1)`` -> Dense ``(in, out)``."""
    return a[:, :, 0].T


def to_vector(a: np.ndarray) -> np.ndarray:
    """Weight-norm magnitudes ``(out, 1, 1)``, ``(out, 1)``, ``(1, 1, k)`` and the like -> 1-D."""
    return a.reshape(-1)


@dataclass(frozen=True)
class Rule:
    """Map keys fully matching ``source`` to ``target`` (``None``: drop) through ``transform``."""

    source: str
    target: str | None
    transform: Transform = identity
    stack: str | None = None

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.source, key)


_CANONICAL = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)


def canonical_key(key: str) -> str:
    """Spell weight-norm parameters the old way (``weight_g``/``weight_v``)."""
    for new, old in _CANONICAL:
        if key.endswith(new):
            return key[: -len(new)] + old
    return key


def prefixed(prefix: str, rules: Iterable[Rule], target_prefix: str = "") -> list[Rule]:
    """The same rules under a state-dict key prefix (and optionally a Flax sub-path).

    ``target_prefix`` is inserted after the collection name: ``params/x`` -> ``params/<target_prefix>/x``.
    """
    out = []
    for r in rules:
        target = r.target
        if target is not None and target_prefix:
            collection, _, rest = target.partition("/")
            target = f"{collection}/{target_prefix}/{rest}"
        out.append(Rule(re.escape(prefix) + r.source, target, r.transform, r.stack))
    return out


def _shape_of(transform: Transform, value) -> jax.ShapeDtypeStruct:
    """The shape and (canonical JAX) dtype of ``transform(value)``, from ``value``'s shape alone."""
    return jax.eval_shape(transform, jax.ShapeDtypeStruct(tuple(np.shape(value)), value.dtype))


@dataclass(frozen=True)
class LazyVariable:
    """One converted variable, not computed yet: ``read()`` reads its source tensors (a
    :class:`~almtok_jax.weights.torch_io.LazyTensor` reads its bytes only then), applies the rule's transform and,
    for a stacked variable, writes each layer into its slot of the one ``(L, ...)`` array it allocates.
    ``shape`` and ``dtype`` (the canonical JAX dtype: int64 is stored as int32 unless x64 is enabled) are
    known without reading anything, so a model directory can be written one variable at a time."""

    sources: tuple[tuple[object, Transform], ...]  # (tensor, transform): one, or one per layer in order
    stacked: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The variable's values (a fresh array; nothing is kept)."""
        if not self.stacked:
            (tensor, transform), = self.sources
            return np.asarray(transform(np.asarray(tensor)), self.dtype)
        out = np.empty(self.shape, self.dtype)
        for layer, (tensor, transform) in zip(out, self.sources, strict=True):
            layer[...] = transform(np.asarray(tensor))
        return out


def _variable(sources: list[tuple[object, Transform]], stacked: bool) -> LazyVariable | jax.ShapeDtypeStruct:
    """The variable made of ``sources`` (a shape only when the sources are shapes)."""
    one = _shape_of(sources[0][1], sources[0][0])
    shape = (len(sources), *one.shape) if stacked else one.shape
    if isinstance(sources[0][0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, one.dtype)
    return LazyVariable(tuple(sources), stacked, shape, np.dtype(one.dtype))


def _describe(items: list[str], limit: int = 60) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


class _Layer(NamedTuple):
    """One layer of a stacked variable: the checkpoint ``key`` it comes from, its ``shape`` after
    ``transform``, and the tensor ``value``."""

    key: str
    shape: tuple[int, ...]
    value: object
    transform: Transform


def _odd_layers(by_index: Mapping[int, _Layer],
                layer_shape: tuple[int, ...] | None) -> list[tuple[int, str]]:
    """``(layer index, reason)`` of the layers of a stack whose shape differs from the others'. With the
    model's per-layer shape known, every layer not of that shape (when the layers disagree among
    themselves; a stack uniformly of another shape is reported whole, as a wrong shape)."""
    shapes = {i: layer.shape for i, layer in by_index.items()}
    if len(set(shapes.values())) == 1:
        return []
    if layer_shape is not None:
        return [(i, f"model expects {layer_shape} per layer") for i, s in sorted(shapes.items()) if s != layer_shape]
    counts = {s: list(shapes.values()).count(s) for s in set(shapes.values())}
    common = max(counts, key=counts.get)
    return [(i, f"the other layers give {common}") for i, s in sorted(shapes.items()) if s != common]


def convert_state_dict(state_dict: Mapping[str, np.ndarray], rules: Iterable[Rule],
                       expected: Mapping | None = None, *, source: str = "state dict", lazy: bool = False) -> dict:
    """Apply ``rules`` to ``state_dict`` and return the nested Flax variables.

    ``expected`` (optional) is a nested mapping of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape(model.init, ...)``): every path it holds must be produced with the same shape, and
    nothing else. Everything is checked from the tensors' shapes before any value is read, and
    :class:`MappingError` lists every problem at once; ``source`` names the file. The values are then
    NumPy arrays, or with ``lazy`` :class:`LazyVariable` leaves that read their tensors when asked (a
    state dict of ``jax.ShapeDtypeStruct`` gives ``jax.ShapeDtypeStruct`` leaves).
    """
    rules = list(rules)
    flat: dict[str, LazyVariable | jax.ShapeDtypeStruct] = {}
    stacked: dict[str, dict[int, _Layer]] = {}
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    problems: list[str] = []
    for key, value in state_dict.items():
        ckey = canonical_key(key)
        rule = next((r for r in rules if r.match(ckey)), None)
        if rule is None:
            unexpected.append(f"{key} {tuple(np.shape(value))}")
            continue
        if rule.target is None:
            continue
        groups = rule.match(ckey).groupdict()
        path = rule.target.format(**groups)
        if rule.stack is None:
            if path in sources:
                problems.append(f"{path}: both {sources[path]} and {key} map to it")
            flat[path], sources[path] = _variable([(value, rule.transform)], stacked=False), key
        else:
            index = int(groups[rule.stack])
            if index in stacked.get(path, {}):
                problems.append(f"{path} layer {index}: both {stacked[path][index].key} and {key} map to it")
            layer_shape = tuple(_shape_of(rule.transform, value).shape)
            stacked.setdefault(path, {})[index] = _Layer(key, layer_shape, value, rule.transform)
    want = ({"/".join(k): v for k, v in traverse_util.flatten_dict(dict(expected)).items()}
            if expected is not None else {})
    reported: set[str] = set()  # stacked paths with a problem already listed (not "missing" on top)
    for path, by_index in stacked.items():
        indices = sorted(by_index)
        if indices != list(range(len(indices))):
            problems.append(f"{path}: layers {indices} are not 0..{len(indices) - 1}")
            reported.add(path)
            continue
        odd = _odd_layers(by_index, tuple(want[path].shape[1:]) if path in want else None)
        if odd:
            problems.extend(f"{path}: layer {i} ({by_index[i].key}) gives {by_index[i].shape}, {reason}"
                            for i, reason in odd)
            reported.add(path)
            continue
        flat[path] = _variable([(by_index[i].value, by_index[i].transform) for i in indices], stacked=True)
    if expected is not None:
        missing = sorted(set(want) - set(flat) - reported)
        extra = sorted(set(flat) - set(want))
        wrong = [f"{p}: checkpoint gives {tuple(flat[p].shape)}, model expects {tuple(want[p].shape)}"
                 for p in sorted(set(want) & set(flat)) if tuple(flat[p].shape) != tuple(want[p].shape)]
        if missing:
            problems.append(f"{len(missing)} missing (model variables no key provides):{_describe(missing)}")
        if extra:
            problems.append(f"{len(extra)} mapped to variables the model does not have:{_describe(extra)}")
        if wrong:
            problems.append(f"{len(wrong)} with the wrong shape:{_describe(wrong)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (no rule matches):{_describe(sorted(unexpected))}")
    if problems:
        raise MappingError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    if not lazy:
        flat = {p: v.read() if isinstance(v, LazyVariable) else v for p, v in flat.items()}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
