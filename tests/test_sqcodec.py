"""SQ codec: quantizer, length rules, config/checkpoint validation, jit caching, release loading."""

from __future__ import annotations

import dataclasses
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from almtok_jax.golden.configs import sqcodec_config
from almtok_jax.mapping import MappingError
from almtok_jax.sqcodec import (
    SQCODEC,
    SQCodec,
    SQCodecConfig,
    decoded_length,
    latent_frames,
    round_latents,
    sq_decode,
    sq_encode,
)
from almtok_jax.weights.release import read_sq_config
from almtok_jax.weights.torch_io import load_state_dict

CAUSAL_FIXTURE = FIXTURES / "core" / "sqcodec_causal.npz"
RELEASE = FIXTURES / "release_tiny"

TINY = SQCodecConfig(downsample_factors=(2, 3), downsample_kernel_sizes=(4, 6), upsample_factors=(3, 2),
                     upsample_kernel_sizes=(6, 4), latent_hidden_dim=3, init_channel=2)


def _fixture_state_dict(path=CAUSAL_FIXTURE) -> tuple[dict[str, np.ndarray], SQCodecConfig]:
    import json

    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        sd = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    return sd, sqcodec_config(meta["config"])


@cache
def _variables_struct(config: SQCodecConfig) -> dict:
    dummy = jax.ShapeDtypeStruct((1, 2 * config.hop_length, config.num_bands), jnp.float32)
    return jax.eval_shape(SQCodec(config).init, jax.random.key(0), dummy)


def _random_variables(config: SQCodecConfig, seed: int = 0) -> dict:
    """Random weights without compiling ``init`` (its many RNG calls compile slowly on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.2, 0.6, s.shape), jnp.float32)
                        * rng.choice([-1.0, 1.0], s.shape).astype(np.float32), _variables_struct(config))


def _shapes(config: SQCodecConfig, batch: int, samples: int) -> tuple[tuple, tuple]:
    """Encoder latent and decoder waveform shapes, by abstract evaluation (nothing is computed)."""
    wav = jax.ShapeDtypeStruct((batch, samples), jnp.float32)
    latent = jax.eval_shape(partial(sq_encode, config=config), _variables_struct(config), wav)
    decoded = jax.eval_shape(partial(sq_decode, config=config), _variables_struct(config), latent)
    return latent.shape, decoded.shape


def test_quantize_round_half_even_no_clamp():
    z = jnp.array([0.5, 1.5, -0.5, -1.5, 2.5, 0.1, -0.98], jnp.float32)  # 9z = 4.5, 13.5, ... exactly
    q = np.asarray(round_latents(z))
    want = np.array([4, 14, -4, -14, 22, 1, -9], np.float32) / np.float32(9)
    np.testing.assert_array_equal(q, want)
    np.testing.assert_array_equal(q, np.round(np.asarray(z) * np.float32(9)) / np.float32(9))


def test_quantize_gradient_is_identity():
    z = jnp.linspace(-1.3, 1.3, 11, dtype=jnp.float32)
    w = jnp.arange(11, dtype=jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(round_latents(x) * w))(z)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))


NS2 = dict(num_samples=2, downsample_factors=(2, 4, 4, 5, 3), downsample_kernel_sizes=(4, 8, 8, 10, 6),
           upsample_factors=(3, 5, 4, 4, 2), upsample_kernel_sizes=(6, 10, 8, 8, 4), init_channel=4)


@pytest.mark.parametrize(("config", "samples", "frames", "decoded"), [
    (SQCodecConfig(), 288000, 300, 288000),
    (SQCodecConfig(), 288123, 301, 288960),
    (SQCodecConfig(), 6720, 7, 6720),
    (SQCodecConfig(causal=False), 288000, 300, 288193),
    (SQCodecConfig(causal=False), 288123, 300, 288193),
    (SQCodecConfig(causal=False, latent_hidden_dim=8, **NS2), 7680, 8, 8064),
    (SQCodecConfig(causal=False, latent_hidden_dim=8, **NS2), 6001, 6, 6144),
    (SQCodecConfig(**NS2), 6001, 7, 6720),
])
def test_output_lengths_follow_the_spec(config, samples, frames, decoded):
    assert latent_frames(samples, config) == frames
    assert decoded_length(frames, config) == decoded
    latent, wav = _shapes(config, 2, samples)
    assert latent == (2, frames, config.latent_hidden_dim)
    assert wav == (2, decoded, config.num_bands)


def test_released_architecture_parameter_count():
    # Spec A.6: 168,231,351 parameters (g, v and bias counted; the shared down-sampling slope once).
    sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(_variables_struct(SQCodecConfig()))]
    assert sum(sizes) == 168_231_351


def test_causal_lengths_are_multiples_of_the_hop():
    for samples in range(1, 14):
        frames = latent_frames(samples, TINY)
        assert frames == -(-samples // TINY.hop_length)
        assert decoded_length(frames, TINY) == frames * TINY.hop_length
    assert _shapes(TINY, 1, 7) == ((1, 2, 3), (1, 12, 1))


def test_config_from_yaml_requires_exactly_the_13_fields(tmp_path):
    good = RELEASE / "sq_config.yaml"
    assert read_sq_config(good).init_channel == 2
    text = good.read_text()
    (tmp_path / "missing.yaml").write_text(text.replace("    res_kernel_size: 7\n", ""))
    with pytest.raises(ValueError, match=r"missing config keys \['res_kernel_size'\]"):
        read_sq_config(tmp_path / "missing.yaml")
    (tmp_path / "extra.yaml").write_text(text + "    dropout: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['dropout'\]"):
        read_sq_config(tmp_path / "extra.yaml")
    with pytest.raises(ValueError, match="kernel = 2 x stride"):
        SQCodecConfig(upsample_kernel_sizes=(10, 8, 8, 8, 7))
    assert SQCodecConfig().hop_length == 960


def test_config_checkpoint_mismatch_is_one_clear_error():
    sd, config = _fixture_state_dict()
    wrong = dataclasses.replace(config, init_channel=8)
    with pytest.raises(MappingError, match=r"encoder\.0\.weight_v: checkpoint \(4, 1, 7\), config implies "
                                           r"\(8, 1, 7\)"):
        SQCODEC.load(sd, wrong)
    wrong = dataclasses.replace(config, res_kernel_size=5)
    with pytest.raises(MappingError, match=r"convs\.0\.conv1\.weight_v: checkpoint \(4, 4, 7\)"):
        SQCODEC.load(sd, wrong)
    fewer = dataclasses.replace(config, **{k: getattr(config, k)[:4] for k in (
        "downsample_factors", "downsample_kernel_sizes", "upsample_factors", "upsample_kernel_sizes")})
    with pytest.raises(MappingError, match="5 encoder stages .* 4 in the config"):
        SQCODEC.load(sd, fewer)
    two = dataclasses.replace(config, num_samples=2)
    with pytest.raises(MappingError, match="lacks the PreProcessor"):
        SQCODEC.load(sd, two)


def test_shared_down_prelu_last_copy_wins():
    sd, config = _fixture_state_dict()
    keys = sorted(k for k in sd if k.endswith("down_conv.activation.weight"))
    assert len(keys) == config.num_stages
    variables = SQCODEC.load(sd, config)
    assert float(variables["params"]["encoder"]["down_activation"][0]) == float(sd[keys[-1]][0])
    for i, k in enumerate(keys):
        sd[k] = np.array([0.1 * (i + 1)], np.float32)
    with pytest.warns(UserWarning, match="shared down-sampling PReLU copies differ"):
        variables = SQCODEC.load(sd, config)
    slope = variables["params"]["encoder"]["down_activation"]
    np.testing.assert_allclose(slope, [0.1 * len(keys)], rtol=1e-6)


def test_encode_decode_compile_once_per_shape():
    variables = _random_variables(TINY)
    before = sq_encode._cache_size(), sq_decode._cache_size()
    for seed in range(3):
        wav = jax.random.normal(jax.random.key(seed), (2, 30))
        latent = sq_encode(variables, wav, TINY)
        out = sq_decode(variables, latent, TINY)
    assert (sq_encode._cache_size(), sq_decode._cache_size()) == (before[0] + 1, before[1] + 1)
    assert latent.shape == (2, 5, 3) and out.shape == (2, 30, 1)
    # (B, N) and (B, N, 1) inputs are the same waveform.
    np.testing.assert_array_equal(np.asarray(sq_encode(variables, wav[..., None], TINY)), np.asarray(latent))
    with pytest.raises(ValueError, match=r"waveform must be \(B, N, 1\)"):
        sq_encode(variables, jnp.zeros((2, 30, 2)), TINY)
    with pytest.raises(ValueError, match=r"latents must be \(B, F >= 1, 3\)"):
        sq_decode(variables, jnp.zeros((2, 5, 4)), TINY)


def test_release_tiny_sqcodec_loads_and_decodes():
    config = read_sq_config(RELEASE / "sq_config.yaml")
    sd = load_state_dict(RELEASE / "sqcodec.pth", select="codec_model")
    assert len(sd) == 447
    variables = SQCODEC.load(sd, config, source="sqcodec.pth")
    with np.load(RELEASE / "expected.npz") as z:
        latents, wave = z["out/dec_latents_speech"][:, :12], z["out/wave_speech"][:, : 10 * config.hop_length]
    # Causal decoder with 2 frames of look-ahead (decoder.0): 12 frames fix the first 10 frames' samples.
    out = np.asarray(sq_decode(variables, jnp.asarray(latents), config))
    assert out.shape == (1, 12 * config.hop_length, 1)
    np.testing.assert_allclose(out[:, : wave.shape[1], 0], wave, atol=1e-5, rtol=0)
