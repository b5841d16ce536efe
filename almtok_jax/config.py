"""One tree of frozen dataclasses for every hyper-parameter, with YAML load/save.

Each component's config class lives next to the module it configures (``SQCodecConfig`` in
:mod:`almtok_jax.sqcodec`, ...) and is re-exported here; :class:`ALMTokenizer2Config` ties them together.
Presets are YAML files in ``configs/``: ``almtokenizer2.yaml`` is the released architecture, the
``tiny_*.yaml`` files are the test architectures of the fixtures.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from etils import epath

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(tp: Any, value: Any, where: str) -> Any:
    """Turn plain YAML data into ``tp`` (dataclasses, tuples, optionals), checking field names."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        args = typing.get_args(tp)
        if value is None:
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error naming the key."""
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown} (known: {sorted(fields)})")
    return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def to_dict(config: Any) -> Any:
    """Plain nested dicts/lists, ready for YAML."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    return config


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config of type ``cls`` from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return from_dict(cls, data, where=str(path))


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config as YAML (keys in field order); ``path`` may be a URI (``etils.epath``)."""
    with epath.Path(path).open("w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def override(config: T, assignments: list[str]) -> T:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dataclass."""
    data = to_dict(config)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node, dict) or p not in node:
                raise ValueError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"override {item!r}: no config key {leaf!r}")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(type(config), data)


# ----------------------------------------------------------------------------------------------------
# The model tree. Component configs live next to their modules; defaults are the released architecture.

from almtok_jax.audio import LogMelConfig  # noqa: E402
from almtok_jax.experts.fusion import FusionConfig  # noqa: E402
from almtok_jax.experts.musicfm import MusicFMConfig  # noqa: E402
from almtok_jax.experts.wavlm import WavLMConfig  # noqa: E402
from almtok_jax.experts.whisper import WhisperConfig  # noqa: E402
from almtok_jax.flow.cfm import FlowLossConfig, SamplerConfig  # noqa: E402
from almtok_jax.flow.dit import DiTConfig  # noqa: E402
from almtok_jax.pipeline import PipelineConfig  # noqa: E402
from almtok_jax.quantizer.query import QuantizerConfig  # noqa: E402
from almtok_jax.sqcodec import SQCodecConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """The three frozen semantic experts and the Whisper front end."""

    logmel: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
    whisper: WhisperConfig = dataclasses.field(default_factory=WhisperConfig)
    wavlm: WavLMConfig = dataclasses.field(default_factory=WavLMConfig)
    musicfm: MusicFMConfig = dataclasses.field(default_factory=MusicFMConfig)


@dataclasses.dataclass(frozen=True)
class ALMTokenizer2Config:
    """Every hyper-parameter of ALMTokenizer2; the defaults are the released model."""

    experts: ExpertsConfig = dataclasses.field(default_factory=ExpertsConfig)
    fusion: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    quantizer: QuantizerConfig = dataclasses.field(default_factory=QuantizerConfig)
    dit: DiTConfig = dataclasses.field(default_factory=DiTConfig)
    flow_loss: FlowLossConfig = dataclasses.field(default_factory=FlowLossConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    sqcodec: SQCodecConfig = dataclasses.field(default_factory=SQCodecConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)


def load_model_config(path: str | Path) -> ALMTokenizer2Config:
    """A model preset: a YAML file, or the name of one in ``configs/`` (``almtokenizer2``, ``tiny_release``)."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = CONFIG_DIR / f"{path}.yaml"
    return load_yaml(ALMTokenizer2Config, p)


__all__ = [
    "ALMTokenizer2Config", "DiTConfig", "ExpertsConfig", "FlowLossConfig", "FusionConfig", "LogMelConfig",
    "MusicFMConfig", "PipelineConfig", "QuantizerConfig", "SQCodecConfig", "SamplerConfig", "WavLMConfig",
    "WhisperConfig", "from_dict", "load_model_config", "load_yaml", "override", "save_yaml", "to_dict",
]
