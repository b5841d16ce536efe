"""A release's architecture and weights in our terms: :func:`derive_config` reads the architecture off the
release's files and the checkpoint's key names and shapes, each component deriving its own part;
:func:`convert_checkpoint` routes every key of the reference's two state dicts to the one component whose
key prefix owns it and maps it through that component's rules (see :mod:`almtok_jax.component`)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.component import CODEC_STATE, MODEL_STATE, DeriveError, ReleaseFiles
from almtok_jax.config import ALMTokenizer2Config
from almtok_jax.mapping import MappingError
from almtok_jax.model import components


def absent_components(states: Mapping[str, Mapping], config: ALMTokenizer2Config, source: str) -> dict[str, str]:
    """Component name -> one line, for each converted component of which ``states`` (state-dict name ->
    state dict) holds no key (e.g. a checkpoint saved without its frozen experts), with the number of
    tensors it needs."""
    problems = {}
    for c in components(config):
        if c.source is not None and not any(c.owns(k) for k in states[c.source]):
            needed = len(jax.tree.leaves(c.abstract_variables(c.config(config))))
            where = c.key_prefix or ", ".join(f"{n}." for n in c.key_names or ())
            problems[c.name] = (f"{source}: component {c.name} is missing from {c.source}: none of the {needed} "
                                f"tensors it needs (keys under {where}) is there")
    return problems


def derive_config(model_state: Mapping, codec_state: Mapping, files: ReleaseFiles, source: str = "release",
                  base: ALMTokenizer2Config | None = None) -> ALMTokenizer2Config:
    """The architecture of a release: every component's ``derive`` over the keys it owns and the release
    ``files`` (see :mod:`almtok_jax.component`); what neither states stays as in ``base`` (default: the
    release architecture, the config defaults). Only names and shapes of the states are read.

    Raises :class:`DeriveError` for a missing component, keys that describe no buildable architecture, or
    component widths that do not chain (fusion output = quantizer width = DiT condition width).
    """
    config = base if base is not None else ALMTokenizer2Config()
    states = {MODEL_STATE: model_state, CODEC_STATE: codec_state}
    absent = absent_components(states, config, source)
    if absent:
        raise DeriveError("\n".join(absent.values()))
    for c in components(config):
        if c.source is not None:
            try:
                config = c.derived(config, states[c.source], files)
            except DeriveError:
                raise
            except ValueError as e:  # a config class refusing the derived numbers
                raise DeriveError(f"{source}: the keys of component {c.name} give no valid config: {e}") from None
    widths = {"fusion.codec_dim": config.fusion.codec_dim, "quantizer.dim": config.quantizer.dim,
              "dit.cond_dim": config.dit.cond_dim}
    if len(set(widths.values())) > 1:
        raise DeriveError(f"{source}: the component widths do not chain: {widths}")
    return config


def convert_checkpoint(model_state: Mapping[str, np.ndarray], codec_state: Mapping[str, np.ndarray],
                       config: ALMTokenizer2Config, source: str = "release", lazy: bool = False) -> dict[str, dict]:
    """Reference state dicts (``ep*.checkpoint['model']``, ``sqcodec.pth['codec_model']``) -> variables
    (state dicts of ``jax.ShapeDtypeStruct`` give the variables' shapes through the same rules).

    With ``lazy`` the variables are :class:`~almtok_jax.mapping.LazyVariable` leaves: everything is checked,
    but a value is read from the (lazily opened) state dicts only when its variable is read, one variable at a
    time, e.g. by :func:`~almtok_jax.weights.model_dir.save_model_dir` as it writes it.

    Every key goes to the one component whose key prefix owns it; a key no component owns, a component
    without any key (one line each), a variable no key provides and every shape mismatch are collected over
    all components and raised together as one :class:`MappingError` naming ``source``.
    """
    states = {MODEL_STATE: model_state, CODEC_STATE: codec_state}
    converted = [c for c in components(config) if c.source is not None]
    absent = absent_components(states, config, source)
    variables, problems = {}, list(absent.values())
    for state_name, state in states.items():
        owners = [c for c in converted if c.source == state_name]
        unowned = [f"{k} {tuple(np.shape(v))}" for k, v in state.items() if not any(c.owns(k) for c in owners)]
        if unowned:
            problems.append(f"{source}: {len(unowned)} keys of {state_name} belong to no component:\n    "
                            + "\n    ".join(unowned))
    for c in (c for c in converted if c.name not in absent):
        try:
            variables[c.name] = c.load(states[c.source], c.config(config), source=f"{source} [{c.name}]",
                                       lazy=lazy)
        except MappingError as e:
            problems.append(str(e))
    if problems:
        raise MappingError("\n".join(problems))
    if lazy:
        return variables
    return jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jnp.asarray(a), variables)
