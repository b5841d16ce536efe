"""The three frozen semantic experts (:mod:`.whisper`, :mod:`.wavlm`, :mod:`.musicfm`) and the glue that
fuses their streams (:mod:`.fusion`)."""

from __future__ import annotations

import dataclasses

from almtok_jax.audio import LogMelConfig
from almtok_jax.experts.musicfm import MusicFMConfig
from almtok_jax.experts.wavlm import WavLMConfig
from almtok_jax.experts.whisper import WhisperConfig


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """The three frozen semantic experts and the Whisper front end."""

    logmel: LogMelConfig = dataclasses.field(default_factory=LogMelConfig)
    whisper: WhisperConfig = dataclasses.field(default_factory=WhisperConfig)
    wavlm: WavLMConfig = dataclasses.field(default_factory=WavLMConfig)
    musicfm: MusicFMConfig = dataclasses.field(default_factory=MusicFMConfig)
