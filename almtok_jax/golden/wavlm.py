"""Golden handler for ``wavlm_tiny``-style fixtures: ``get_wavlm_feature`` and its intermediates."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.experts.wavlm import WAVLM, WavLMConfig, WavLMExpert, relative_position_bucket, wavlm_features
from almtok_jax.golden.configs import wavlm_config
from almtok_jax.golden.runner import Fixture


@partial(jax.jit, static_argnames=("config",))
def _intermediates(variables: dict, wav24k: jax.Array, config: WavLMConfig) -> dict:
    _, state = WavLMExpert(config).apply(variables, wav24k, mutable=["intermediates"])
    return jax.tree.map(lambda sown: sown[0], state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))


def _load(fx: Fixture, config: WavLMConfig) -> dict:
    return jax.tree.map(jnp.asarray, WAVLM.load(fx.state_dict, config, source=str(fx.path)))


def wavlm(fx: Fixture) -> dict[str, np.ndarray]:
    config = wavlm_config(fx.config["wavlm_model"])
    # out/hidden_states holds every layer of the checkpoint; the feature path stops at the last averaged one.
    every_layer = dataclasses.replace(config, feature_layers=(0, config.num_hidden_layers + 1))
    cases = sorted(name.removeprefix("audio24k_") for name in fx.inputs if name.startswith("audio24k_"))
    inputs = {case: jnp.asarray(fx.inputs[f"audio24k_{case}"][:, 0]) for case in cases}  # upstream: (B, 1, N)
    variables = _load(fx, config)
    variables_every_layer = _load(fx, every_layer)
    start, stop = config.feature_layers
    out: dict[str, jax.Array] = {}
    for case, wav24k in inputs.items():
        inter = _intermediates(variables_every_layer, wav24k, every_layer)
        encoder = inter["wavlm_encoder"]
        hidden_states = inter["hidden_states"]
        positions = jnp.arange(hidden_states.shape[2])
        out |= {
            f"wavlm_feature_{case}": jnp.transpose(wavlm_features(variables, wav24k, config), (0, 2, 1)),
            f"wav16k_padded_{case}": inter["wav16k_padded"],
            f"conv_features_{case}": jnp.transpose(encoder["conv_features"], (0, 2, 1)),
            f"extract_features_{case}": encoder["extract_features"],
            f"hidden_states_{case}": hidden_states,
            f"hidden_states_6to9_{case}": hidden_states[:, start:stop],
            f"rel_pos_bucket_{case}": relative_position_bucket(
                positions[None, :] - positions[:, None], config.num_buckets, config.max_bucket_distance),
        }
    return {name: np.asarray(value) for name, value in out.items() if name in fx.expected}
