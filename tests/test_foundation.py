"""Config tree, key mapping and the PyTorch-exact layers (their numerics are covered by the golden tests)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from almtok_jax import mapping
from almtok_jax.config import ALMTokenizer2Config, load_model_config, override, save_yaml
from almtok_jax.layers import Conv1d, ConvTranspose1d, weight_norm
from almtok_jax.mapping import MappingError, Rule, convert_state_dict


def test_presets_round_trip(tmp_path):
    full = load_model_config("almtokenizer2")
    assert full == ALMTokenizer2Config()
    assert full.dit.num_layers == 32 and full.quantizer.rvq.codebook_size == 8192
    tiny = load_model_config("tiny_release")
    assert tiny.dit.num_layers == 2 and tiny.sqcodec.init_channel == 2
    save_yaml(tiny, tmp_path / "t.yaml")
    assert load_model_config(tmp_path / "t.yaml") == tiny


def test_override_and_unknown_keys(tmp_path):
    cfg = override(ALMTokenizer2Config(), ["dit.num_layers=4", "sampler.guidance_scale=2"])
    assert cfg.dit.num_layers == 4 and cfg.sampler.guidance_scale == 2.0
    with pytest.raises(ValueError, match="no config key 'nope'"):
        override(cfg, ["dit.nope=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit:\n  num_layerz: 3\n")
    with pytest.raises(ValueError, match="num_layerz"):
        load_model_config(bad)


def test_mapping_reports_everything_at_once():
    rules = [Rule(r"a\.weight", "params/a/kernel", mapping.linear),
             Rule(r"blocks\.(?P<i>\d+)\.w", "params/blocks/w", stack="i"),
             Rule(r"unused\..*", None)]
    expected = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32)},
                           "blocks": {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32)},
                           "b": {"bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}}
    good = {"a.weight": np.zeros((2, 3)), "blocks.1.w": np.ones(4), "blocks.0.w": np.zeros(4), "unused.x": 1}
    out = convert_state_dict({**good, "b.bias": np.zeros(2)},
                             rules + [Rule(r"b\.bias", "params/b/bias")], expected)
    assert out["params"]["blocks"]["w"].tolist() == [[0] * 4, [1] * 4]
    with pytest.raises(MappingError) as e:
        convert_state_dict({**good, "a.weight": np.zeros((5, 3)), "stray": np.zeros(1)}, rules, expected,
                           source="ck.pth")
    msg = str(e.value)
    assert "ck.pth" in msg and "params/b/bias" in msg and "stray" in msg and "params/a/kernel" in msg


def test_weight_norm_spellings_are_one():
    rules = [Rule(r"c\.weight_g", "params/c/weight_g", mapping.to_vector)]
    for key in ("c.weight_g", "c.parametrizations.weight.original0"):
        assert convert_state_dict({key: np.ones((3, 1, 1))}, rules)["params"]["c"]["weight_g"].shape == (3,)


def test_weight_norm_axis():
    v = jnp.arange(1.0, 13.0).reshape(2, 3, 2)
    w = weight_norm(v, jnp.array([2.0, 3.0]), keep_axis=-1)
    np.testing.assert_allclose(jnp.linalg.norm(w[..., 0]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(w[..., 1]), 3.0, rtol=1e-6)


@pytest.mark.parametrize("k,s,p,op,length", [(8, 4, 2, 0, 9), (10, 5, 0, 0, 3), (3, 2, 1, 1, 7), (4, 1, 0, 0, 5)])
def test_conv_transpose_length_is_pytorchs(k, s, p, op, length):
    layer = ConvTranspose1d(3, k, stride=s, padding=p, output_padding=op)
    x = jnp.ones((1, length, 2))
    y = jax.eval_shape(lambda x: layer.init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert y.shape == (1, (length - 1) * s - 2 * p + (k - 1) + op + 1, 3)


def test_conv_transpose_matches_a_direct_scatter():
    layer = ConvTranspose1d(2, 4, stride=3, padding=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 3))
    variables = layer.init(jax.random.PRNGKey(2), x)
    kernel = np.asarray(variables["params"]["kernel"])  # (k, in, out)
    full = np.zeros((1, (5 - 1) * 3 + 4, 2))
    for t in range(5):
        full[0, t * 3: t * 3 + 4] += np.einsum("i,kio->ko", np.asarray(x[0, t]), kernel)
    np.testing.assert_allclose(layer.apply(variables, x)[0], full[0, 1:-1] + np.asarray(variables["params"]["bias"]),
                               atol=1e-5)


@pytest.mark.parametrize("padding,expected", [("causal", 12), (2, 12), ("same_torch", 12), ("valid", 8)])
def test_conv_padding_modes(padding, expected):
    layer = Conv1d(4, 5, padding=padding, dilation=1)
    y = jax.eval_shape(lambda x: layer.init_with_output(jax.random.PRNGKey(0), x)[0], jnp.ones((1, 12, 2)))
    assert y.shape == (1, expected, 4)


def test_causal_conv_does_not_look_ahead():
    layer = Conv1d(3, 4, dilation=2, padding="causal")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 2))
    variables = layer.init(jax.random.PRNGKey(1), x)
    x2 = x.at[:, 6:].set(0.0)
    np.testing.assert_allclose(layer.apply(variables, x)[:, :6], layer.apply(variables, x2)[:, :6])


def test_config_is_a_static_jit_argument():
    """Equal configs loaded separately share one compilation; a changed field compiles anew."""
    scale = jax.jit(lambda x, cfg: x * cfg.sampler.num_steps, static_argnums=1)
    first, second = load_model_config("tiny_release"), load_model_config("tiny_release")
    assert first is not second
    scale(1.0, first)
    assert float(scale(1.0, second)) == first.sampler.num_steps and scale._cache_size() == 1
    more_steps = dataclasses.replace(first, sampler=dataclasses.replace(first.sampler,
                                                                        num_steps=first.sampler.num_steps + 1))
    assert float(scale(1.0, more_steps)) == first.sampler.num_steps + 1 and scale._cache_size() == 2
