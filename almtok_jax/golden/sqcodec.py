"""Golden handler for the SQ codec fixtures (``sqcodec_*.npz``, channels-first ``(B, C, L)`` arrays)."""

from __future__ import annotations

import numpy as np

from almtok_jax.golden.configs import sqcodec_config
from almtok_jax.golden.runner import Fixture
from almtok_jax.sqcodec import (
    SQCODEC,
    round_latents,
    sq_decode,
    sq_forward_trace,
)


def _to_jax(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 2, 1))


def _to_fixture(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 2, 1)


def sqcodec(fx: Fixture) -> dict[str, np.ndarray]:
    """Every ``out/*`` of case ``t``: latent, latent_q, decode (of our own latent), forward, decode_zrand and
    the ``trace_<encoder|decoder>.<i>`` outputs.

    One traced forward per case gives the latent (``tanh`` of the last encoder element), the traces and the
    reconstruction, which *is* ``decode(latent)`` (the decoder quantizes first); ``decode_zrand`` runs the
    public :func:`sq_decode`. Compiling the codec dominates the run time, so nothing is compiled twice.
    """
    config = sqcodec_config(fx.config)
    variables = SQCODEC.load(fx.state_dict, config, source=fx.path.name)
    last_encoder = f"encoder.{config.num_stages + (2 if config.num_samples > 1 else 1)}"
    out: dict[str, np.ndarray] = {}
    for t in sorted(k.removeprefix("wav_") for k in fx.inputs if k.startswith("wav_")):
        forward, traces = sq_forward_trace(variables, _to_jax(fx.inputs[f"wav_{t}"]), config)
        latent = np.tanh(np.asarray(traces[last_encoder]))
        out[f"latent_{t}"] = _to_fixture(latent)
        out[f"latent_q_{t}"] = _to_fixture(round_latents(latent))
        out[f"decode_{t}"] = out[f"forward_{t}"] = _to_fixture(forward)
        if f"zrand_{t}" in fx.inputs:
            zrand = _to_jax(fx.inputs[f"zrand_{t}"])
            out[f"decode_zrand_{t}"] = _to_fixture(sq_decode(variables, zrand, config))
        for name, value in traces.items():
            out[f"trace_{name}_{t}"] = _to_fixture(value)
    return out
