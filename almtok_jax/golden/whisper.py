"""Golden handler for the ``whisper_encoder`` fixture: encoder on the stored mels, n_len truncation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.experts.whisper import WHISPER, WhisperEncoder, whisper_feature, whisper_n_len
from almtok_jax.golden.configs import whisper_fixture_config
from almtok_jax.golden.runner import Fixture


def whisper_encoder(fx: Fixture) -> dict[str, np.ndarray]:
    config = whisper_fixture_config(fx.config)
    model = WhisperEncoder(config)
    variables = WHISPER.load(fx.state_dict, config, source=str(fx.path))
    encode = jax.jit(lambda mel: model.apply(variables, mel, output_hidden_states=True))
    out: dict[str, np.ndarray] = {}
    for case in fx.config["cases"]:
        mel = jnp.asarray(fx.inputs[f"mel_{case}"]).transpose(0, 2, 1)  # fixture is (B, mel, frame)
        last, hidden = encode(mel)
        num_samples = fx.inputs[f"audio24k_{case}"].shape[-1]
        out[f"whisper_feature_{case}"] = np.asarray(whisper_feature(last, num_samples)).transpose(0, 2, 1)
        if f"last_hidden_state_{case}" in fx.expected:
            out[f"last_hidden_state_{case}"] = np.asarray(last)
            t = fx.expected[f"hidden_states_first100_{case}"].shape[2]
            out[f"hidden_states_first100_{case}"] = np.asarray(hidden[:, :, :t]).transpose(1, 0, 2, 3)
    out["nlen"] = np.array([whisper_n_len(int(n), max_frames=config.max_source_positions)
                            for n in fx.inputs["nlen_N"]], dtype=np.int64)
    return out
