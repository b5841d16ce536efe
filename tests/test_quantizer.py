"""Query quantizer: interleaving layouts, odd frame counts, public encode_codes/dequantize, training forward,
configs, RoPE buffer check, and the optional GPT loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FIXTURES

from almtok_jax import layers
from almtok_jax.golden.configs import quantizer_config
from almtok_jax.quantizer import (
    BlockConfig,
    CodePredictor,
    GPTLossConfig,
    PronunciationConfig,
    QuantizerConfig,
    QueryQuantizer,
    RVQConfig,
    TransformerBlock,
    check_rope_buffers,
    dequantize,
    encode_codes,
    extract_frames,
    extract_queries,
    gpt_loss,
    interleave_masks,
    interleave_queries,
    rope_inv_freq,
    train_forward,
)
from almtok_jax.quantizer.query import QUANTIZER

TINY = QuantizerConfig(block=BlockConfig(dim=64, dim_heads=32), encoder_depth=1, decoder_depth=1,
                       rvq=RVQConfig(dim=64, codebook_size=16, codebook_dim=4, num_quantizers=2),
                       pronunciation=PronunciationConfig(output_channels=6, decode_channels=8))


@pytest.fixture(scope="module")
def tiny_variables():
    return jax.jit(QUANTIZER.init, static_argnums=0)(TINY, jax.random.key(0))


def _labels(b: int, t: int) -> jnp.ndarray:
    """Frame ``t`` of sample ``b`` is the vector filled with ``100 b + t + 1``."""
    return (100 * jnp.arange(b)[:, None, None] + jnp.arange(t)[None, :, None] + 1.0) * jnp.ones((1, 1, 3))


def test_encoder_interleaving_layout():
    seq = interleave_queries(_labels(2, 6), jnp.zeros((1, 3)), 2)
    np.testing.assert_array_equal(seq[0, :, 0], [1, 2, 0, 3, 4, 0, 5, 6, 0])
    np.testing.assert_array_equal(seq[1, :, 0], [101, 102, 0, 103, 104, 0, 105, 106, 0])
    np.testing.assert_array_equal(extract_queries(jnp.arange(9.0)[None, :, None], 2)[0, :, 0], [2, 5, 8])


def test_decoder_interleaving_layout():
    seq = interleave_masks(_labels(1, 3), -jnp.ones((1, 3)), 2)
    np.testing.assert_array_equal(seq[0, :, 0], [-1, -1, 1, -1, -1, 2, -1, -1, 3])
    np.testing.assert_array_equal(extract_frames(jnp.arange(9.0)[None, :, None], 2)[0, :, 0],
                                  [0, 1, 3, 4, 6, 7])


def test_odd_frame_count_release_raises(tiny_variables):
    """The runtime ``compat`` alone decides; the config has no say (it has no compat field)."""
    assert "compat" not in {f.name for f in dataclasses.fields(QuantizerConfig)}
    with pytest.raises(ValueError, match="not a multiple of the query interval"):
        encode_codes(tiny_variables, jnp.zeros((1, 5, TINY.dim)), TINY, "release")
    with pytest.raises(ValueError, match="not a multiple of the query interval"):
        QueryQuantizer(TINY, compat="release").apply(tiny_variables, jnp.zeros((1, 5, TINY.dim)),
                                                     method="encode_codes")
    codes, _ = encode_codes(tiny_variables, jnp.zeros((1, 6, TINY.dim)), TINY, "release")
    assert codes.shape == (1, 3, TINY.rvq.num_quantizers)
    with pytest.raises(ValueError, match="compat"):
        encode_codes(tiny_variables, jnp.zeros((1, 6, TINY.dim)), TINY, "strict")


def test_odd_frame_count_default_pads_last_frame(tiny_variables):
    x = jax.random.normal(jax.random.key(1), (2, 5, TINY.dim))
    codes, quantized = encode_codes(tiny_variables, x, TINY, "default")
    assert codes.shape == (2, 3, TINY.rvq.num_quantizers) and quantized.shape == (2, 3, TINY.dim)
    padded = jnp.concatenate([x, x[:, -1:]], axis=1)
    codes_padded, quantized_padded = encode_codes(tiny_variables, padded, TINY)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(codes_padded))
    np.testing.assert_array_equal(np.asarray(quantized), np.asarray(quantized_padded))
    assert dequantize(tiny_variables, codes, TINY).shape == (2, 6, TINY.dim)


def test_quantize_dequantize_compile_once_per_shape(tiny_variables):
    x = jax.random.normal(jax.random.key(2), (2, 8, TINY.dim))
    q0, d0 = encode_codes._cache_size(), dequantize._cache_size()
    for seed in range(3):
        codes, _ = encode_codes(tiny_variables, x + seed, TINY)
        cond = dequantize(tiny_variables, codes, TINY)
    assert encode_codes._cache_size() == q0 + 1 and dequantize._cache_size() == d0 + 1
    assert codes.dtype == jnp.int32 and codes.shape == (2, 4, 2)
    assert cond.shape == (2, 8, TINY.dim) and np.all(np.isfinite(np.asarray(cond)))


def test_bad_feature_width_is_a_clear_error(tiny_variables):
    with pytest.raises(ValueError, match=r"\(B, T, 64\)"):
        encode_codes(tiny_variables, jnp.zeros((1, 4, 7)), TINY)


def test_train_forward_updates_codebook_and_is_differentiable(tiny_variables):
    params, codebook = tiny_variables["params"], tiny_variables["codebook"]
    x = jax.random.normal(jax.random.key(3), (2, 8, TINY.dim))
    target = jax.random.normal(jax.random.key(4), (2, 17, 6))  # T_w = 4N + 1: truncated to 16

    def loss(params):
        out, new_codebook = train_forward(params, codebook, x, TINY, jax.random.key(5), target)
        return out["commit_loss"] + 0.5 * out["phone_loss"] + jnp.mean(out["cond"] ** 2), (out, new_codebook)

    grads, (out, new_codebook) = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert out["pron_pred"].shape == (2, 16, 6) and out["cond"].shape == (2, 8, TINY.dim)
    assert out["vq_losses"].shape == (2,) and float(out["commit_loss"]) > 0
    assert not np.array_equal(np.asarray(new_codebook["vq_embed"]["cluster_size"]),
                              np.asarray(codebook["vq_embed"]["cluster_size"]))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert float(jnp.abs(grads["encoder_transformers"]["blocks"]["ff"]["out"]["bias"]).sum()) > 0
    assert float(jnp.abs(grads["vq_embed"]["project_in"]["kernel"]).sum()) > 0


def test_fresh_layer_scales_come_from_the_config(tiny_variables):
    """The training init (the module's own initializers) sets every LayerScale to ``block.layer_scale_init``."""
    for stack in ("encoder_transformers", "decoder_transformers"):
        blocks = tiny_variables["params"][stack]["blocks"]
        for name in ("self_attn_scale", "ff_scale"):
            np.testing.assert_array_equal(blocks[name], np.full((1, TINY.dim), TINY.block.layer_scale_init, np.float32))


def test_decoder_only_loading_matches_sampler_fixture(shared_dir):
    from almtok_jax.golden.runner import load_fixture
    from almtok_jax.quantizer.query import DECODER_PARTS

    fx = load_fixture(shared_dir / "fixtures/core/sampler.npz")
    config = quantizer_config(fx.config)
    variables = QUANTIZER.load(fx.state_dict, config, names=DECODER_PARTS)  # DiT keys are ignored
    assert "encoder_transformers" not in variables["params"]
    codes = jnp.asarray(fx.inputs["codes_noprefix"]).transpose(0, 2, 1)
    with jax.default_matmul_precision("highest"):
        cond = dequantize(variables, codes, config)
    np.testing.assert_allclose(np.asarray(cond), fx.expected["cond_noprefix"], rtol=0,
                               atol=fx.meta["atol"]["cond_noprefix"])


def test_released_defaults():
    c = QuantizerConfig()
    assert (c.dim, c.block.heads, c.block.rotary_dim, c.block.ff_inner) == (768, 6, 64, 3072)
    assert (c.encoder_depth, c.decoder_depth, c.interval) == (6, 8, 2)
    assert (c.rvq.num_quantizers, c.rvq.codebook_size, c.rvq.codebook_dim, c.rvq.decay) == (8, 8192, 32, 0.9)
    assert c.rvq.threshold_ema_dead_code == 2 and c.rvq.gradient == "rotation_trick"
    shapes = jax.eval_shape(TransformerBlock(c.block).init, jax.random.key(0), jnp.zeros((1, 3, 768)))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == 9_456_128  # spec 02 §3.9


def test_invalid_block_config():
    with pytest.raises(ValueError, match="rotary dim"):
        BlockConfig(dim=32, dim_heads=16)


@pytest.mark.parametrize("rotary_dim", [16, 32, 48, 64, 96, 128, 256])
def test_rope_buffer_check_tells_another_libm_from_another_architecture(rotary_dim):
    block = BlockConfig(dim=4 * rotary_dim, dim_heads=2 * rotary_dim, rope_dim=rotary_dim)
    good = rope_inv_freq(block)
    assert good.shape == (block.rotary_dim // 2,) and good[0] == 1.0
    key = "encoder_transformers.0.rope.inv_freq"
    check_rope_buffers({key: good}, block)
    # a float32 pow (numpy's) is the same formula through another libm: a few ulp away, accepted
    exponent = np.arange(0, block.rotary_dim, 2, dtype=np.float32) / np.float32(block.rotary_dim)
    other_libm = np.float32(1) / np.power(np.float32(block.rope_base), exponent)
    assert layers.ulp_distance(other_libm, good).max() <= 2
    check_rope_buffers({key: other_libm}, block)
    for wrong_base in (5000.0, 10001.0):
        with pytest.raises(ValueError, match=rf"{key} differs from the RoPE table .* ulp \(max \|diff\|"):
            check_rope_buffers({key: layers.rotary_inv_freq(block.rotary_dim, wrong_base)}, block)
    with pytest.raises(ValueError, match=rf"{key} has shape \({block.rotary_dim // 2 + 1},\)"):
        check_rope_buffers({key: layers.rotary_inv_freq(block.rotary_dim + 2, block.rope_base)}, block)


@pytest.mark.parametrize("release", ["release_tiny", "release_rope64"])
def test_model_rope_table_is_the_released_buffer_bit_for_bit(release):
    from almtok_jax.weights.torch_io import load_state_dict

    state = load_state_dict(FIXTURES / release / "ep5.checkpoint", select="model")
    buffers = {k: v for k, v in state.items() if k.endswith("rope.inv_freq")}
    dim = state["encoder_transformers.0.self_attn.q_norm.weight"].shape[0]
    table = rope_inv_freq(BlockConfig(dim=dim, dim_heads=dim))
    assert buffers and all(v.dtype == np.float32 and v.tobytes() == table.tobytes() for v in buffers.values())


def test_ulp_distance_across_zero_and_signs():
    a = np.array([0.0, -0.0, 1.0, -1.0, 1e-45], np.float32)
    b = np.array([1e-45, 1e-45, np.nextafter(np.float32(1), np.float32(2)), -1.0, -1e-45], np.float32)
    np.testing.assert_array_equal(layers.ulp_distance(a, b), [1, 1, 1, 0, 2])


def test_gpt_loss_decreases_when_trained_alone():
    config = GPTLossConfig(enabled=True, layers=1, heads=2, width=32, max_len=16)
    predictor = CodePredictor(config, num_quantizers=2, codebook_size=8)
    z = jax.random.normal(jax.random.key(0), (2, 12, 16))
    codes = jax.random.randint(jax.random.key(1), (2, 12, 2), 0, 8)
    params = predictor.init(jax.random.key(2), z)["params"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: gpt_loss(predictor, p, z, codes))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
