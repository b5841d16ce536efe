"""The component contract: everything the rest of the package needs to know about one part of the model.

Each component module defines one :class:`Component` at its bottom; :data:`almtok_jax.model.COMPONENTS`
lists them in the order of the model picture. A component says

* how it is built: ``config_path`` (``"experts.wavlm"``) is where its config sits in the
  :class:`~almtok_jax.config.ALMTokenizer2Config` (read by :meth:`Component.config`, written by
  :meth:`Component.derived`), ``module(config)`` builds the Flax module and
  ``example_inputs(config)`` gives the (shape-only) inputs of its ``init``;
* where its weights come from: ``source`` names the reference state dict (:data:`MODEL_STATE`,
  :data:`CODEC_STATE`, or ``None`` for a part only training makes), ``key_prefix`` is prepended to every
  rule of ``rules(config)`` (the one place a prefix is attached) and, with ``key_names``, routes a key of
  that state dict to this component (first dotted names after the prefix; ``None``: every key under it);
  ``check_state`` (optional) checks the routed keys' values against the config before conversion (it is
  skipped for a shape-only state dict of ``jax.ShapeDtypeStruct``);
* its architecture: ``derive(key_shapes, base, files)`` (optional) reads the component config off a
  release: the release file that states it (``files``: parsed release files by name, see
  :mod:`almtok_jax.weights.release`), then the names and shapes of the keys it owns (``key_shapes``: key relative
  to ``key_prefix``, weight norm spelled ``weight_g``/``weight_v`` -> shape); numbers neither reveals stay
  as in ``base`` (the release architecture);
* its variables: :meth:`Component.init` (the module's own initializers, the training init) and
  :meth:`Component.abstract_variables` (their shapes, what conversion and model directories are checked
  against); :meth:`Component.load` converts the routed keys of a reference state dict.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.mapping import Rule, canonical_key, convert_state_dict, prefixed

MODEL_STATE = "ep*.checkpoint['model']"
CODEC_STATE = "sqcodec.pth['codec_model']"

KeyShapes = Mapping[str, tuple[int, ...]]
ReleaseFiles = Mapping[str, Mapping[str, Any]]
# The release files a derive reads, by name (parsed; an optional file that is absent is not in the mapping).
SQ_CONFIG = "sq_config.yaml"  # its generator.config section
DIT_CONFIG = "model_config.json"
WHISPER_CONFIG = "whisper-medium/config.json"


class DeriveError(ValueError):
    """A release's keys do not describe an architecture this package builds."""


def layer_indices(key_shapes: KeyShapes, prefix: str) -> list[int]:
    """Sorted distinct ``N`` of the keys ``<prefix>N.<rest>`` (``prefix`` literal, e.g. ``"layers."``)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in key_shapes if (m := pattern.match(k))})


def shape_of(key_shapes: KeyShapes, key: str, component: str) -> tuple[int, ...]:
    """The shape of ``key``; a missing key is a :class:`DeriveError` naming the component."""
    if key not in key_shapes:
        raise DeriveError(f"{component}: the checkpoint has no {key!r}, which gives its architecture")
    return tuple(key_shapes[key])


def is_abstract(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds shapes only (``jax.ShapeDtypeStruct`` values)."""
    return any(isinstance(v, jax.ShapeDtypeStruct) for v in state_dict.values())


def always(model_config: Any) -> bool:
    del model_config
    return True


def shapes(*shape_list: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """float32 example inputs of the given shapes."""
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shape_list)


@dataclass(frozen=True)
class Component:
    """One part of the model (module docstring)."""

    name: str
    frozen: bool
    config_path: str
    module: Callable[[Any], nn.Module]
    example_inputs: Callable[[Any], tuple[jax.ShapeDtypeStruct, ...]]
    rules: Callable[[Any], list[Rule]]
    source: str | None = MODEL_STATE
    key_prefix: str = ""
    key_names: tuple[str, ...] | None = None
    check_state: Callable[[Mapping[str, np.ndarray], Any, str], None] | None = None
    enabled: Callable[[Any], bool] = always
    derive: Callable[[KeyShapes, Any, ReleaseFiles], Any] | None = None

    def config(self, model_config: Any) -> Any:
        """This component's config inside ``model_config`` (at :attr:`config_path`)."""
        for part in self.config_path.split("."):
            model_config = getattr(model_config, part)
        return model_config

    def owns(self, key: str, names: tuple[str, ...] | None = None) -> bool:
        """Whether state-dict ``key`` of :attr:`source` belongs here (restricted to ``names`` if given)."""
        if not key.startswith(self.key_prefix):
            return False
        allowed = names if names is not None else self.key_names
        return allowed is None or key[len(self.key_prefix):].split(".")[0] in allowed

    def relative_key_shapes(self, state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """``{key relative to key_prefix: shape}`` of the keys of ``state_dict`` this component owns."""
        return {canonical_key(k[len(self.key_prefix):]): tuple(np.shape(v))
                for k, v in state_dict.items() if self.owns(k)}

    def derived(self, model_config: Any, state_dict: Mapping[str, Any], files: ReleaseFiles) -> Any:
        """``model_config`` with this component's config replaced by :attr:`derive` of ``state_dict``'s
        keys (unchanged without ``derive``)."""
        if self.derive is None:
            return model_config
        config = self.derive(self.relative_key_shapes(state_dict), self.config(model_config), files)
        return replace_at(model_config, self.config_path, config)

    def key_rules(self, config: Any) -> list[Rule]:
        """:attr:`rules` on full state-dict keys."""
        return prefixed(self.key_prefix, self.rules(config))

    def abstract_variables(self, config: Any) -> dict:
        """``jax.ShapeDtypeStruct`` tree of every variable (``jax.eval_shape`` of the module's ``init``;
        traced once per config)."""
        return _abstract_variables(self, config)

    def init(self, config: Any, key: jax.Array) -> dict:
        """Fresh variables from the module's own initializers (jit it: the dummy forward pass is then dead)."""
        inputs = [jnp.zeros(x.shape, x.dtype) for x in self.example_inputs(config)]
        return self.module(config).init(key, *inputs)

    def load(self, state_dict: Mapping[str, np.ndarray], config: Any, source: str = "state dict",
             names: tuple[str, ...] | None = None, lazy: bool = False) -> dict:
        """Variables (NumPy) from the keys of ``state_dict`` this component owns; other keys are ignored.

        ``names`` (key names, equal to the module's top-level submodule names) loads only those parts;
        ``lazy`` gives :class:`~almtok_jax.mapping.LazyVariable` leaves, read when asked for.
        Raises :class:`~almtok_jax.mapping.MappingError` naming ``source`` and every problem.
        """
        owned = {k: v for k, v in state_dict.items() if self.owns(k, names)}
        if self.check_state is not None and not is_abstract(owned):
            self.check_state(owned, config, source)
        expected = self.abstract_variables(config)
        if names is not None:
            expected = {col: {n: t for n, t in tree.items() if n in names} for col, tree in expected.items()}
            expected = {col: tree for col, tree in expected.items() if tree}
        return convert_state_dict(owned, self.key_rules(config), expected, source=source, lazy=lazy)


def replace_at(config: Any, path: str, value: Any) -> Any:
    """Frozen dataclass ``config`` with the field at dotted ``path`` replaced by ``value``."""
    head, _, rest = path.partition(".")
    new = replace_at(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: new})


@functools.cache
def _abstract_variables(component: Component, config: Any) -> dict:
    return jax.eval_shape(component.module(config).init, jax.random.key(0), *component.example_inputs(config))
