"""The model's config tree, :class:`ALMTokenizer2Config` (its defaults are the released architecture; each
component's config lives next to its module), and the shipped presets (``configs/``)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path

from almtok_jax.audio import LogMelConfig
from almtok_jax.experts import ExpertsConfig
from almtok_jax.experts.fusion import FusionConfig
from almtok_jax.experts.musicfm import MusicFMConfig
from almtok_jax.experts.wavlm import WavLMConfig
from almtok_jax.experts.whisper import WhisperConfig
from almtok_jax.flow.cfm import FlowLossConfig, SamplerConfig
from almtok_jax.flow.dit import DiTConfig
from almtok_jax.pipeline import PipelineConfig
from almtok_jax.quantizer.query import QuantizerConfig
from almtok_jax.sqcodec import SQCodecConfig
from almtok_jax.typed_config import (  # re-exported: the loader was part of this module
    ConfigError,
    from_dict,
    load_yaml,
    override,
    read_yaml,
    save_yaml,
    to_dict,
)

CONFIG_DIR = Path(__file__).parent / "configs"


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

    def __post_init__(self) -> None:
        rates = {"pipeline.sample_rate": self.pipeline.sample_rate, "sqcodec.sample_rate": self.sqcodec.sample_rate,
                 "experts.wavlm.input_sample_rate": self.experts.wavlm.input_sample_rate,
                 "experts.musicfm.sample_rate": self.experts.musicfm.sample_rate}
        if len(set(rates.values())) > 1:
            raise ConfigError(f"ALMTokenizer2Config: every part reads the same waveform, but the rates differ: "
                              f"{rates}")


# Keys older files may still hold, with why they are ignored.
RETIRED_KEYS = {
    ("quantizer", "compat"): "compat is a runtime choice, not part of a model "
                             "(--compat / ALMTokenizer2.load(..., compat=...))",
}


def model_config_from_dict(data: Mapping, where: str = "ALMTokenizer2Config") -> ALMTokenizer2Config:
    """:class:`ALMTokenizer2Config` from plain data (a preset's differences from the release, or a model
    directory's complete ``config.yaml``). A retired key (:data:`RETIRED_KEYS`: model directories written
    before ``compat`` left the config hold ``quantizer.compat``) is dropped with a warning naming it."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {data!r} is not allowed; expected a mapping of ALMTokenizer2Config keys")
    data = dict(data)
    for (section, key), why in RETIRED_KEYS.items():
        if isinstance(data.get(section), Mapping) and key in data[section]:
            value = data[section][key]
            data[section] = {k: v for k, v in data[section].items() if k != key}
            warnings.warn(f"{where}: ignoring {section}.{key}={value!r}: {why}", stacklevel=2)
    return from_dict(ALMTokenizer2Config, data, where)


def preset_names() -> list[str]:
    """The model and training presets shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A YAML file as given, else the shipped preset of that name (``tiny_release``, ``train_tiny``, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if not p.suffix and (CONFIG_DIR / f"{p}.yaml").is_file():
        return CONFIG_DIR / f"{p}.yaml"
    raise FileNotFoundError(f"config {name_or_path} is neither a file nor a preset ({', '.join(preset_names())})")


def load_model_config(path: str | Path) -> ALMTokenizer2Config:
    """A model preset: a YAML file, or the name of a shipped one (``almtokenizer2``, ``tiny_release``, ``mid``)."""
    p = preset_path(path)
    return model_config_from_dict(read_yaml(p), where=str(p))


__all__ = [
    "ALMTokenizer2Config", "ConfigError", "DiTConfig", "ExpertsConfig", "FlowLossConfig", "FusionConfig",
    "LogMelConfig", "MusicFMConfig", "PipelineConfig", "QuantizerConfig", "SQCodecConfig", "SamplerConfig",
    "WavLMConfig", "WhisperConfig", "from_dict", "load_model_config", "load_yaml", "model_config_from_dict",
    "override", "preset_path", "read_yaml", "save_yaml", "to_dict",
]
