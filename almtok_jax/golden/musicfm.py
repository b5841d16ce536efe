"""Golden handler for ``musicfm`` fixtures: MusicFM-25Hz as ``extract_continous_embeds_multiple`` runs it."""

from __future__ import annotations

import functools

import jax
import numpy as np

from almtok_jax.experts.musicfm import MUSICFM, MusicFM, MusicFMConfig, with_output_layers
from almtok_jax.golden.configs import musicfm_config
from almtok_jax.golden.runner import Fixture


@functools.partial(jax.jit, static_argnames="config")
def _run(variables: dict, wav: jax.Array, config: MusicFMConfig) -> tuple[tuple[jax.Array, ...], dict]:
    results, state = MusicFM(config).apply(variables, wav, mutable=["intermediates"])
    return results, {k: v[0] for k, v in state["intermediates"].items()}


def musicfm(fx: Fixture) -> dict[str, np.ndarray]:
    """Every ``out/*`` of the fixture; the model is built with all layer results so ``layer_results`` fits."""
    base = musicfm_config(fx.config)
    config = with_output_layers(base, range(base.encoder_depth + 1))
    variables = MUSICFM.load(fx.state_dict, config, source=fx.path.name)
    acoustic_layer, semantic_layer = base.output_layers
    outputs: dict[str, np.ndarray] = {}
    for name, audio in fx.inputs.items():
        case = name.removeprefix("audio24k_")
        results, inter = _run(variables, audio[:, 0, :], config)
        outputs[f"acoustic_{case}"] = np.asarray(results[acoustic_layer]).transpose(0, 2, 1)
        outputs[f"semantic_{case}"] = np.asarray(results[semantic_layer]).transpose(0, 2, 1)
        outputs[f"layer_results_{case}"] = np.stack([np.asarray(r) for r in results], axis=1)
        outputs[f"mel_db_{case}"] = np.asarray(inter["mel_db"]).transpose(0, 2, 1)[:, None]
        outputs[f"mel_norm_{case}"] = np.asarray(inter["mel_norm"]).transpose(0, 2, 1)[:, None]
        outputs[f"conv2d_{case}"] = np.asarray(inter["conv2d"]).transpose(0, 3, 1, 2)
    return outputs
