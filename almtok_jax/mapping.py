"""Declarative mapping from reference (PyTorch) state-dict keys to Flax variable paths.

Each model module owns a list of :class:`Rule` next to its definition. A rule matches a whole key with a
regular expression; its named groups fill the ``{group}`` placeholders of the target path, whose first
element is the Flax collection (``params/...``, ``batch_stats/...``, ``codebook/...``). A rule with
``target=None`` drops the key on purpose (unused buffers, training-only heads). ``stack="i"`` stacks the
arrays of every value of group ``i`` along a new leading axis, in index order, for layers run by
``nn.scan``. :func:`convert_state_dict` applies the first matching rule to every key and reports every
missing, unexpected and wrongly shaped tensor at once.

Keys are canonicalised first, so both weight-norm spellings (``weight_g``/``weight_v`` and
``parametrizations.weight.original0``/``original1``) match rules written with ``weight_g``/``weight_v``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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


def flatten(a: np.ndarray) -> np.ndarray:
    """Weight-norm magnitudes ``(out, 1, 1)``, ``(out, 1)``, ``(1, 1, k)`` and the like -> 1-D."""
    return a.reshape(-1)


def scalar(a: np.ndarray) -> np.ndarray:
    """A 1-element tensor -> 0-d."""
    return a.reshape(())


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


def _describe(items: list[str], limit: int = 60) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def _route(state_dict: Mapping, rules: list[Rule]) -> tuple[dict, dict, list[str]]:
    """Which rule takes each key, from the keys alone: ``({path: (key, rule)}, {path: {layer: (key, rule)}},
    unexpected)``; dropped keys appear nowhere."""
    flat: dict[str, tuple[str, Rule]] = {}
    stacked: dict[str, dict[int, tuple[str, Rule]]] = {}
    unexpected: list[str] = []
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
            flat[path] = (key, rule)
        else:
            stacked.setdefault(path, {})[int(groups[rule.stack])] = (key, rule)
    return flat, stacked, unexpected


def _stack_layers(state_dict: Mapping, by_index: dict[int, tuple[str, Rule]]) -> np.ndarray | set:
    """The layers' transformed arrays stacked along a new leading axis, read one at a time into one
    preallocated array (with ``np.stack``'s dtype); the set of their shapes if these differ."""
    out = None
    shapes = set()
    dtype = np.result_type(*(state_dict[key].dtype for key, _ in by_index.values()))
    for i in sorted(by_index):
        key, rule = by_index[i]
        layer = rule.transform(np.asarray(state_dict[key]))
        shapes.add(layer.shape)
        if len(shapes) > 1:
            continue
        if out is None:
            out = np.empty((len(by_index), *layer.shape), dtype)
        out[i] = layer
    return out if len(shapes) == 1 else shapes


def convert_state_dict(state_dict: Mapping[str, np.ndarray], rules: Iterable[Rule],
                       expected: Mapping | None = None, *, source: str = "state dict") -> dict:
    """Apply ``rules`` to ``state_dict`` and return the nested Flax variables (NumPy arrays).

    ``expected`` (optional) is a nested mapping of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape(model.init, ...)``): every path it holds must be produced with the same shape, and
    nothing else. Raises :class:`MappingError` listing every problem at once; ``source`` names the file.

    Values are read one at a time (``np.asarray``), so ``state_dict`` may map names to lazily read tensors
    (:func:`almtok_jax.torch_io.open_state_dict`): dropped keys are never read, and each stacked array is
    filled in place, layer by layer. Only ``np.shape`` and ``.dtype`` of a value are used before reading.
    """
    flat_rules, stacked_rules, unexpected = _route(state_dict, list(rules))
    problems: list[str] = []
    flat: dict[str, np.ndarray] = {}
    for path, (key, rule) in flat_rules.items():
        flat[path] = rule.transform(np.asarray(state_dict[key]))
    for path, by_index in stacked_rules.items():
        indices = sorted(by_index)
        if indices != list(range(len(indices))):
            problems.append(f"{path}: layers {indices} are not 0..{len(indices) - 1}")
            continue
        stacked = _stack_layers(state_dict, by_index)
        if isinstance(stacked, set):
            problems.append(f"{path}: layers have different shapes {sorted(stacked)}")
        else:
            flat[path] = stacked
    if expected is not None:
        want = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(expected)).items()}
        missing = sorted(set(want) - set(flat))
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
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
