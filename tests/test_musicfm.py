"""MusicFM-25Hz expert: length rules, partial depth, jit caching, input errors, loading the fixture."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from almtok_jax.experts.musicfm import (
    MUSICFM,
    MusicFM,
    MusicFMConfig,
    min_input_length,
    num_output_frames,
    trimmed_length,
)
from almtok_jax.golden.configs import musicfm_config
from almtok_jax.golden.runner import load_fixture
from almtok_jax.mapping import MappingError

TINY = MusicFMConfig(conv_dim=4, encoder_dim=16, encoder_depth=5, num_heads=2, ffn_dim=32,
                     output_layers=(1, 3))
FIXTURE = FIXTURES / "experts" / "musicfm_tiny.npz"


@functools.partial(jax.jit, static_argnames="config")
def musicfm_features(variables: dict, wav: jax.Array, config: MusicFMConfig) -> tuple[jax.Array, ...]:
    """The layer results ALMTokenizer2 reads (acoustic, semantic), applied as ``model.expert_streams`` does."""
    return MusicFM(config).apply(variables, wav)


@pytest.fixture(scope="module")
def tiny_variables():
    return jax.jit(MUSICFM.init, static_argnums=0)(TINY, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.fail(f"fixture not found: {FIXTURE}")
    return load_fixture(FIXTURE)


@pytest.mark.parametrize(("n", "kept", "frames"), [
    (1920, 1920, 2), (2879, 1920, 2), (2880, 2880, 3), (48240, 48000, 50), (30000, 29760, 31),
    (288240, 288000, 300),
])
def test_length_rules(n, kept, frames):
    assert trimmed_length(n, MusicFMConfig()) == kept
    assert num_output_frames(n, MusicFMConfig()) == frames


@pytest.mark.parametrize("n", [1920, 2879, 3841, 48240])
def test_output_shapes_follow_floor_n_over_960(tiny_variables, n):
    wav = jax.ShapeDtypeStruct((2, n), jnp.float32)
    acoustic, semantic = jax.eval_shape(lambda v, x: musicfm_features(v, x, TINY), tiny_variables, wav)
    assert acoustic.shape == semantic.shape == (2, n // 960, TINY.encoder_dim)


def test_fresh_buffers_match_the_reference_constants(tiny_variables, fixture):
    prefix = MUSICFM.key_prefix + "preprocessor_melspec_2048.mel_stft."
    buffers = tiny_variables["buffers"]
    np.testing.assert_allclose(buffers["mel_stft"]["window"], fixture.buffers[prefix + "spectrogram.window"],
                               rtol=0, atol=1e-6)
    # float64 rebuild vs torchaudio's float32 construction (spec 01 §5.4)
    np.testing.assert_allclose(buffers["mel_stft"]["fb"], fixture.buffers[prefix + "mel_scale.fb"],
                               rtol=0, atol=2e-5)


def test_blocks_beyond_last_requested_layer_are_not_created():
    shapes = MUSICFM.abstract_variables(TINY)
    layers = shapes["params"]["conformer"]["layers"]
    assert layers["ffn1"]["intermediate_dense"]["kernel"].shape == (3, 16, 32)
    assert shapes["batch_stats"]["conformer"]["layers"]["conv_module"]["batch_norm"]["mean"].shape == (3, 16)
    assert "layer_norm" not in shapes["params"]["conformer"]


def test_fixture_loads_only_needed_layers_and_matches(fixture):
    config = musicfm_config(fixture.config)
    assert config.output_layers == (4, 11) and config.num_blocks == 11
    variables = MUSICFM.load(fixture.state_dict, config)
    assert variables["params"]["conformer"]["layers"]["final_layer_norm"]["scale"].shape[0] == 11
    assert "layer_norm" not in variables["params"]["conformer"]
    assert set(variables) == {"params", "batch_stats", "buffers"}
    with jax.default_matmul_precision("highest"):
        acoustic, semantic = musicfm_features(variables, fixture.inputs["audio24k_odd"][:, 0], config)
    np.testing.assert_allclose(np.asarray(acoustic).transpose(0, 2, 1), fixture.expected["acoustic_odd"],
                               rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(semantic).transpose(0, 2, 1), fixture.expected["semantic_odd"],
                               rtol=0, atol=2e-5)


def test_missing_needed_block_is_reported(fixture):
    config = musicfm_config(fixture.config)
    key = MUSICFM.key_prefix + "conformer.layers.3.self_attn.linear_q.weight"
    state = {k: v for k, v in fixture.state_dict.items() if k != key}
    with pytest.raises(MappingError, match="layers"):
        MUSICFM.load(state, config)


def test_jit_compiles_once_per_shape(tiny_variables):
    before = musicfm_features._cache_size()
    wav = jax.random.normal(jax.random.PRNGKey(1), (2, 2400)) * 0.1
    for _ in range(3):
        acoustic, semantic = musicfm_features(tiny_variables, wav, TINY)
    assert bool(jnp.all(jnp.isfinite(acoustic)) & jnp.all(jnp.isfinite(semantic)))
    assert musicfm_features._cache_size() == before + 1
    musicfm_features(tiny_variables, jnp.zeros((1, 2500), jnp.float32), TINY)
    assert musicfm_features._cache_size() == before + 2


def test_too_short_input_is_a_clear_error(tiny_variables):
    n = min_input_length(TINY) - 1
    with pytest.raises(ValueError, match=f"too short: {n} samples; needs at least 1920"):
        musicfm_features(tiny_variables, jnp.zeros((1, n)), TINY)


def test_wrong_rank_is_a_clear_error(tiny_variables):
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        musicfm_features(tiny_variables, jnp.zeros((1, 1, 4800)), TINY)


def test_bad_output_layers_rejected():
    with pytest.raises(ValueError, match="output_layers"):
        MusicFMConfig(output_layers=(4, 13))
