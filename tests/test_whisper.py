"""Whisper encoder (shapes, errors, n_len rule, key mapping) and the fusion glue (hand-made weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from almtok_jax.config import ExpertsConfig
from almtok_jax.experts.fusion import ExpertFusion, FusionConfig, fusion_lengths, fusion_rules
from almtok_jax.experts.whisper import (
    WhisperConfig,
    WhisperEncoder,
    whisper_feature,
    whisper_n_len,
    whisper_rules,
)
from almtok_jax.mapping import MappingError, convert_state_dict, prefixed

TINY = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=1, encoder_ffn_dim=96,
                     num_mel_bins=80, max_source_positions=1500)


@pytest.fixture(scope="module")
def tiny_encoder():
    model = WhisperEncoder(TINY)
    mel = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3000, 80)), jnp.float32)
    return model, model.init(jax.random.key(0), mel), mel


def _torch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Inverse of :func:`whisper_rules`: our params -> reference keys and layouts (per layer)."""
    sd = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(path[-1], "weight")
        if path[0] == "layers":
            for i in range(value.shape[0]):
                v = value[i].T if path[-1] == "kernel" else value[i]
                sd[".".join(("layers", str(i), *path[1:-1], leaf))] = v
        elif path[0] in ("conv1", "conv2"):
            sd[f"{path[0]}.{leaf}"] = value.transpose(2, 1, 0) if leaf == "weight" else value
        elif path[0] == "embed_positions":
            sd["embed_positions.weight"] = value
        else:
            sd[".".join((*path[:-1], leaf))] = value
    return sd


def test_encoder_shapes_and_hidden_states(tiny_encoder):
    model, variables, mel = tiny_encoder
    last, hidden = model.apply(variables, mel, output_hidden_states=True)
    assert last.shape == (1, 1500, 64) and hidden.shape == (3, 1, 1500, 64)
    np.testing.assert_array_equal(hidden[-1], last)
    np.testing.assert_allclose(model.apply(variables, mel), last, atol=1e-6)


def test_encoder_rejects_other_lengths(tiny_encoder):
    model, variables, _ = tiny_encoder
    with pytest.raises(ValueError, match=r"\(B, 3000, 80\)"):
        model.apply(variables, jnp.zeros((1, 2000, 80)))
    with pytest.raises(ValueError, match="channels-last"):
        model.apply(variables, jnp.zeros((1, 80, 3000)))


def test_rules_round_trip_and_report(tiny_encoder):
    model, variables, mel = tiny_encoder
    sd = _torch_state_dict(variables["params"])
    assert len(sd) == 4 + 1 + 2 + 2 * 15  # conv1/2, positions, final LN, 15 per layer (k_proj has no bias)
    expected = jax.eval_shape(model.init, jax.random.key(0), mel)
    rules = prefixed("whisper_encoder.", whisper_rules(TINY))
    loaded = convert_state_dict({f"whisper_encoder.{k}": v for k, v in sd.items()}, rules, expected=expected)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, dict(variables)))
    del sd["layers.1.fc1.bias"]
    sd["layers.0.self_attn.k_proj.bias"] = np.zeros(64, np.float32)
    del sd["layer_norm.bias"]
    with pytest.raises(MappingError, match="missing") as err:
        convert_state_dict({f"whisper_encoder.{k}": v for k, v in sd.items()}, rules, expected=expected)
    for problem in ("params/layer_norm/bias", "k_proj/bias", "fc1/bias"):
        assert problem in str(err.value)


def test_n_len_rule():
    assert whisper_n_len(13920) == 28 != 13920 // 480  # float expression, fixture "quirk" case
    assert whisper_n_len(288240) == 600 and whisper_n_len(50001) == 104
    assert whisper_n_len(720240) == 1500 and whisper_n_len(10**6) == 1500
    assert whisper_feature(jnp.zeros((2, 1500, 4)), 72240).shape == (2, 150, 4)


# ------------------------------------------------------------------------------------------ fusion

SMALL = FusionConfig(whisper_dim=2, wavlm_dim=2, bestrq_dim=1, codec_dim=1)


def _hand_weights() -> dict:
    """d_convs sum each frame pair; every Linear sums its inputs; feature_proj weights phone/semantic/acoustic
    by 1/10/100 so each stream's contribution is readable in the output."""
    pair_sum = np.stack([np.eye(2), np.eye(2)]).astype(np.float32)  # (k=2, in, out)

    def dense(n_in: int) -> dict:
        return {"kernel": np.ones((n_in, 1), np.float32), "bias": np.zeros(1, np.float32)}

    return {"params": {
        "d_conv_whisper": {"kernel": pair_sum, "bias": np.zeros(2, np.float32)},
        "d_conv_wavlm": {"kernel": pair_sum, "bias": np.zeros(2, np.float32)},
        "cond_fusion_layer_phone": dense(2),
        "cond_fusion_layer_semantic": dense(1),
        "cond_fusion_layer_acoustic": dense(3),
        "feature_proj": {"kernel": np.array([[1.0], [10.0], [100.0]], np.float32),
                         "bias": np.array([0.5], np.float32)},
    }}


def _streams(n_len: int, t_w: int, t_b: int):
    whisper = np.ones((1, n_len, 2), np.float32)  # pair sum over 2 frames x 2 channels -> acoustic += 4
    wavlm = np.full((1, t_w, 2), 0.5, np.float32)  # pair sum x 2 channels -> phone = 2
    ac = np.full((1, t_b, 1), 3.0, np.float32)
    sem = np.arange(t_b, dtype=np.float32).reshape(1, t_b, 1)
    return whisper, wavlm, ac, sem


def test_fusion_hand_computed():
    whisper, wavlm, ac, sem = _streams(n_len=9, t_w=8, t_b=4)  # whisper -> 4 frames (odd frame dropped)
    out = ExpertFusion(SMALL).apply(_hand_weights(), whisper, wavlm, ac, sem)
    expected = 0.5 + 1 * 2.0 + 10 * np.arange(4) + 100 * (3.0 + 4.0)
    assert out.shape == (1, 4, 1)
    np.testing.assert_allclose(out[0, :, 0], expected, atol=1e-4)
    release = ExpertFusion(SMALL, compat="release").apply(_hand_weights(), whisper, wavlm, ac, sem)
    np.testing.assert_array_equal(release, out)


def test_fusion_length_rules():
    weights = _hand_weights()
    # Whisper longer than BEST-RQ: the acoustic stream is cut to T_b in both modes (the reference does this).
    out = ExpertFusion(SMALL, compat="release").apply(weights, *_streams(n_len=12, t_w=8, t_b=4))
    assert out.shape == (1, 4, 1)
    # WavLM one frame longer (spec §6.2, N = 288 959): release raises, default trims to the shortest.
    streams = _streams(n_len=8, t_w=10, t_b=4)
    with pytest.raises(ValueError, match="do not line up"):
        ExpertFusion(SMALL, compat="release").apply(weights, *streams)
    assert ExpertFusion(SMALL).apply(weights, *streams).shape == (1, 4, 1)
    with pytest.raises(ValueError, match="compat"):
        ExpertFusion(SMALL, compat="fixed").apply(weights, *streams)


@pytest.mark.parametrize("n, bestrq, wavlm, n_len, ok", [
    (288240, 300, 600, 600, True), (480240, 500, 1000, 1000, True), (288000, 300, 600, 600, True),
    (288500, 300, 601, 601, True), (288959, 300, 602, 601, False), (720240, 750, 1500, 1500, True)])
def test_fusion_lengths_table(n, bestrq, wavlm, n_len, ok):
    lengths = fusion_lengths(n, ExpertsConfig())
    assert (lengths.bestrq, lengths.wavlm, lengths.n_len, lengths.release_ok) == (bestrq, wavlm, n_len, ok)
    assert lengths.fused == min(wavlm // 2, bestrq, n_len // 2)


def test_fusion_rules_cover_module():
    cfg = FusionConfig(whisper_dim=4, wavlm_dim=3, bestrq_dim=2, codec_dim=5)
    model = ExpertFusion(cfg)
    args = (jnp.zeros((1, 8, 4)), jnp.zeros((1, 8, 3)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 2)))
    expected = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(1)
    shapes = {"d_conv_whisper.weight": (4, 4, 2), "d_conv_wavlm.weight": (3, 3, 2),
              "cond_fusion_layer_phone.weight": (5, 3), "cond_fusion_layer_semantic.weight": (5, 2),
              "cond_fusion_layer_acoustic.weight": (5, 6), "feature_proj.weight": (5, 15)}
    sd = {}
    for k, s in shapes.items():
        sd[k] = rng.standard_normal(s).astype(np.float32)
        sd[k.replace("weight", "bias")] = rng.standard_normal(s[0]).astype(np.float32)
    variables = convert_state_dict(sd, fusion_rules(cfg), expected=expected)
    np.testing.assert_array_equal(variables["params"]["d_conv_whisper"]["kernel"][1],
                                  sd["d_conv_whisper.weight"][:, :, 1].T)
    assert model.apply(variables, *args).shape == (1, 4, 5)
