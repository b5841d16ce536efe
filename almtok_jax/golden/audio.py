"""Golden handlers for the audio front end: ``resample`` and ``whisper_logmel`` fixtures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.audio import (
    Resampler,
    hann_window,
    mel_filters,
    resampler_rules,
    sinc_resample_kernel,
    whisper_log_mel,
)
from almtok_jax.audio import resample as resample_audio
from almtok_jax.golden.configs import logmel_config
from almtok_jax.golden.runner import Fixture
from almtok_jax.mapping import convert_state_dict, prefixed


def _module_resampler(fx: Fixture, orig_sr: int, new_sr: int):
    """A :class:`Resampler` whose kernel is the fixture's ``wavlm_transfer.kernel`` buffer."""
    model = Resampler(orig_sr, new_sr)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.float32))
    variables = convert_state_dict(fx.buffers, prefixed("wavlm_transfer.", resampler_rules()),
                                   expected=expected, source=str(fx.path))
    return jax.jit(lambda x: model.apply(variables, x))


def resample(fx: Fixture) -> dict[str, np.ndarray]:
    cfg = fx.config
    module = cfg["module"]
    out: dict[str, np.ndarray] = {}
    transfer = _module_resampler(fx, module["orig"], module["new"])
    out["y16k"] = transfer(fx.inputs["x24k"])
    for case in cfg["small_lengths"]:
        i = case["index"]
        out[f"y16k_small{i}"] = transfer(fx.inputs[f"x24k_small{i}"])
    out["y16k_functional"] = resample_audio(fx.inputs["x24k"][:, 0], module["orig"], module["new"])
    module_tag = f"{module['orig']}_{module['new']}"
    out[f"kernel_{module_tag}_functional"] = sinc_resample_kernel(module["orig"], module["new"])
    for case in cfg["functional_cases"]:
        orig, new = case["orig"], case["new"]
        tag = f"{orig}_{new}"
        out[f"y_{tag}"] = resample_audio(fx.inputs[f"x_{tag}"], orig, new)
        out[f"kernel_{tag}"] = sinc_resample_kernel(orig, new, cfg["lowpass_filter_width"], cfg["rolloff"])
    for case in cfg["length_quirk_cases"]:
        tag = f"{case['orig']}_{case['new']}"
        out[f"yq_{tag}"] = resample_audio(fx.inputs[f"xq_{tag}"], case["orig"], case["new"])
    return {k: np.asarray(v) for k, v in out.items()}


def whisper_logmel(fx: Fixture) -> dict[str, np.ndarray]:
    config = logmel_config(fx.config)
    out: dict[str, np.ndarray] = {}
    for name in fx.config["cases"]:
        wav = fx.inputs[f"wav16k_{name}"]
        # The reference crops > 30 s silently; the fixture's `over30` case pins that behaviour.
        mel = whisper_log_mel(wav, config, crop=True)
        out[f"input_features_{name}"] = np.asarray(mel).transpose(0, 2, 1)
    out["mel_filters"] = mel_filters(config.sample_rate, config.n_fft, config.n_mels)
    out["hann_window"] = hann_window(config.n_fft)
    return out
