"""WavLM expert: length rules, layer pruning, key mapping, jit behaviour and input errors (tiny widths)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from almtok_jax.audio import sinc_resample_kernel
from almtok_jax.experts.wavlm import (
    WavLMConfig,
    WavLMExpert,
    min_input_samples,
    num_output_frames,
    relative_position_bucket,
    wavlm_expert_rules,
    wavlm_features,
)
from almtok_jax.golden.configs import wavlm_config
from almtok_jax.golden.runner import load_fixture
from almtok_jax.mapping import MappingError, convert_state_dict

WAVLM_FIXTURE = FIXTURES / "experts" / "wavlm_tiny.npz"

TINY = WavLMConfig(hidden_size=128, num_hidden_layers=12, num_attention_heads=2, intermediate_size=32,
                   conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


@pytest.fixture(scope="module")
def tiny_variables():
    """Random weights drawn with NumPy on the init shapes (compiling the init itself takes long on CPU)."""
    shapes = jax.eval_shape(WavLMExpert(TINY).init, jax.random.key(0), jnp.zeros((1, 4000)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        ones = path[-1].key in ("scale", "weight_g", "gru_rel_pos_const")
        return jnp.asarray(ones + 0.05 * rng.normal(size=leaf.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    kernel = jnp.asarray(sinc_resample_kernel(TINY.input_sample_rate, TINY.sample_rate))
    return {"params": params, "buffers": {"wavlm_transfer": {"kernel": kernel}}}


def _noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return 0.1 * jax.random.normal(jax.random.key(seed), shape)


def test_output_frames_follow_the_reference_formula():
    config = WavLMConfig()
    for n in [*range(359, 30000, 97), 48240, 36001, 288240, 480240]:
        assert num_output_frames(n, config) == (math.ceil(2 * n / 3) + 160 - 400) // 320 + 1
    assert num_output_frames(48240, config) == 100
    assert num_output_frames(36001, config) == 75
    assert num_output_frames(288240, config) == 600


def test_shortest_input():
    config = WavLMConfig()
    assert min_input_samples(config) == 359
    assert num_output_frames(359, config) == 1
    assert num_output_frames(358, config) == 0


def test_relative_position_bucket_check_values():
    d = jnp.array([0, -1, -79, -80, -100, -500, -800, -5000, 1, 79, 80, 100, 500, 799, 5000])
    want = [0, 1, 79, 80, 87, 143, 159, 159, 161, 239, 240, 247, 303, 319, 319]
    assert relative_position_bucket(d, 320, 800).tolist() == want


def test_layers_after_the_last_averaged_one_are_not_created():
    shapes = jax.eval_shape(WavLMExpert(TINY).init, jax.random.key(0), jnp.zeros((1, 4000)))
    stacked = shapes["params"]["wavlm_encoder"]["encoder"]["layers"]
    assert TINY.num_layers_used == 9
    assert {leaf.shape[0] for leaf in jax.tree.leaves(stacked)} == {9}


def test_checkpoint_layers_after_the_last_averaged_one_are_dropped():
    fx = load_fixture(WAVLM_FIXTURE)
    config = wavlm_config(fx.config["wavlm_model"], num_hidden_layers=12)
    state_dict = dict(fx.state_dict)
    last = "wavlm_encoder.encoder.layers.8."
    for i in (9, 10, 11):
        state_dict |= {k.replace(last, f"wavlm_encoder.encoder.layers.{i}."): v
                       for k, v in fx.state_dict.items() if k.startswith(last)}
    expected = jax.eval_shape(WavLMExpert(config).init, jax.random.key(0), jnp.zeros((1, 4000)))
    variables = convert_state_dict(state_dict, wavlm_expert_rules(config), expected=expected)
    layers = variables["params"]["wavlm_encoder"]["encoder"]["layers"]
    q_proj_8 = fx.state_dict[last + "attention.q_proj.weight"]
    np.testing.assert_array_equal(layers["q_proj"]["kernel"][8], q_proj_8.T)

    with pytest.raises(MappingError, match="unexpected keys"):
        convert_state_dict(state_dict | {"wavlm_encoder.encoder.layers.12.layer_norm.bias": np.zeros(128)},
                           wavlm_expert_rules(config), expected=expected)


def test_feature_shapes_and_one_compile_per_shape(tiny_variables):
    for n in (359, 4801):
        before = wavlm_features._cache_size()
        first = wavlm_features(tiny_variables, _noise(n, (2, n)), TINY)
        second = wavlm_features(tiny_variables, _noise(n + 1, (2, n)), TINY)
        assert wavlm_features._cache_size() == before + 1
        assert first.shape == second.shape == (2, num_output_frames(n, TINY), TINY.hidden_size)
        assert bool(jnp.all(jnp.isfinite(first)))
        assert not np.allclose(first, second)


def test_batch_rows_are_independent(tiny_variables):
    wav = _noise(7, (2, 1000))
    batched = wavlm_features(tiny_variables, wav, TINY)
    single = wavlm_features(tiny_variables, wav[1:], TINY)
    np.testing.assert_allclose(batched[1:], single, atol=1e-5)


def test_bad_input_is_rejected(tiny_variables):
    with pytest.raises(ValueError, match="too short: at least 359 samples"):
        wavlm_features(tiny_variables, jnp.zeros((1, 358)), TINY)
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        wavlm_features(tiny_variables, jnp.zeros((1, 1, 1000)), TINY)


def test_config_from_hf_rejects_other_variants():
    hf = dataclasses.asdict(WavLMConfig())
    assert wavlm_config(hf) == WavLMConfig()
    with pytest.raises(ValueError, match="do_stable_layer_norm"):
        wavlm_config({**hf, "do_stable_layer_norm": True})
