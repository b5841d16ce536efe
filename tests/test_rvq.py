"""Residual VQ: eval lookup, EMA training with dead-code replacement, gradient estimators, key mapping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from almtok_jax.mapping import convert_state_dict, prefixed
from almtok_jax.quantizer.rvq import (
    ResidualVQ,
    RVQConfig,
    ema_update,
    nearest_code,
    replace_dead_codes,
    rotation_trick,
    rvq_rules,
    straight_through,
)

TINY = RVQConfig(dim=16, codebook_size=32, codebook_dim=4, num_quantizers=3)


def _mixture(key: jax.Array, centres: jax.Array, n: int) -> jax.Array:
    """``n`` points of a Gaussian mixture (std 0.1 around each centre), shape (1, n, dim)."""
    k1, k2 = jax.random.split(key)
    which = jax.random.randint(k1, (n,), 0, centres.shape[0])
    return (centres[which] + 0.1 * jax.random.normal(k2, (n, centres.shape[1])))[None]


def _train(config: RVQConfig, steps: int, batch: int, seed: int = 0):
    model = ResidualVQ(config)
    key = jax.random.key(seed)
    centres = jax.random.normal(jax.random.key(seed + 100), (24, config.dim))
    variables = model.init(key, jnp.zeros((1, 1, config.dim)))
    params, codebook = variables["params"], variables["codebook"]

    @jax.jit
    def step(codebook, key):
        data_key, dead_key = jax.random.split(key)
        x = _mixture(data_key, centres, batch)
        out, state = model.apply({"params": params, "codebook": codebook}, x, True, dead_key,
                                 mutable=["codebook"])
        return state["codebook"], out["losses"]

    losses = []
    for k in jax.random.split(key, steps):
        codebook, layer_losses = step(codebook, k)
        losses.append(np.asarray(layer_losses))
    return model, params, codebook, centres, np.stack(losses)


@pytest.fixture(scope="module")
def trained():
    return _train(TINY, steps=40, batch=256)


def test_ema_training_reduces_commitment_and_uses_codes(trained):
    model, params, codebook, centres, losses = trained
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in codebook.values())
    first, last = losses[:3].mean(), losses[-5:].mean()
    assert last < 0.5 * first, (first, last)
    x = _mixture(jax.random.key(7), centres, 2048)
    codes = np.asarray(model.apply({"params": params, "codebook": codebook}, x)["codes"])[0]
    usage = [len(np.unique(codes[:, i])) / TINY.codebook_size for i in range(TINY.num_quantizers)]
    print(f"codebook usage per layer after 40 EMA steps: {usage}; commitment {first:.4f} -> {last:.4f}")
    assert min(usage) >= 0.75


def test_dead_code_replacement_properties():
    config = RVQConfig(dim=8, codebook_size=64, codebook_dim=8, num_quantizers=1)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    embed = jax.random.normal(k1, (64, 8))
    cluster_size = jnp.where(jnp.arange(64) % 2 == 0, 10.0, 0.5)
    state = (embed, embed * cluster_size[:, None], cluster_size)
    x = jax.random.normal(k2, (40, 8))
    idx = nearest_code(x, embed)
    ema = ema_update(state, x, idx, config)
    new = replace_dead_codes(ema, x, k3, config)
    dead = np.asarray(ema[2] < config.threshold_ema_dead_code)
    assert dead.sum() > 0
    np.testing.assert_array_equal(np.asarray(new[2])[dead], 2.0)
    np.testing.assert_allclose(np.asarray(new[1])[dead], 2.0 * np.asarray(new[0])[dead], rtol=1e-6)
    rows = np.asarray(new[0])[dead]
    dist = np.abs(rows[:, None, :] - np.asarray(x)[None]).sum(-1).min(-1)
    np.testing.assert_array_equal(dist, 0.0)  # every replaced code is one of the inputs
    if dead.sum() <= x.shape[0]:  # distinct rows when there are enough samples
        assert len({tuple(r) for r in rows}) == len(rows)
    for a, b in zip(new, ema, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[~dead], np.asarray(b)[~dead])


def test_first_step_reinitialises_codebook_from_data():
    """From the kaiming init (counts 1) almost every code expires on step 1 and is drawn from the data."""
    model = ResidualVQ(TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1, TINY.dim)))
    x = jax.random.normal(jax.random.key(1), (2, 50, TINY.dim))
    _, state = model.apply(variables, x, True, jax.random.key(2), mutable=["codebook"])
    assert float(np.mean(np.asarray(state["codebook"]["cluster_size"]) == 2.0)) > 0.5


def test_lookup_equals_eval_quantized(trained):
    model, params, codebook, centres, _ = trained
    variables = {"params": params, "codebook": codebook}
    x = _mixture(jax.random.key(11), centres, 30).reshape(3, 10, TINY.dim)
    out = jax.jit(model.apply)(variables, x)
    looked_up = jax.jit(lambda v, c: model.apply(v, c, method="lookup"))(variables, out["codes"])
    assert out["codes"].shape == (3, 10, TINY.num_quantizers) and out["codes"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(looked_up), np.asarray(out["quantized"]))
    np.testing.assert_array_equal(np.asarray(out["losses"]), 0.0)


def test_lookup_rejects_wrong_codebook_count():
    model = ResidualVQ(TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1, TINY.dim)))
    with pytest.raises(ValueError, match="codebook columns"):
        model.apply(variables, jnp.zeros((1, 4, TINY.num_quantizers - 1), jnp.int32), method="lookup")


def test_rotation_trick_value_and_gradient():
    r = jax.random.normal(jax.random.key(0), (6, 5))
    q = jax.random.normal(jax.random.key(1), (6, 5))
    g = jax.random.normal(jax.random.key(2), (6, 5))
    out, vjp = jax.vjp(rotation_trick, r, q)
    np.testing.assert_allclose(np.asarray(out), np.asarray(q), atol=1e-5)
    grad_r, grad_q = vjp(g)
    np.testing.assert_array_equal(np.asarray(grad_q), 0.0)

    def rotate(r):  # the rotation with stop-gradient constants, differentiated by autodiff
        sg = jax.lax.stop_gradient
        u = sg(r / jnp.linalg.norm(r, axis=-1, keepdims=True))
        qh = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        w = sg((u + qh) / jnp.linalg.norm(u + qh, axis=-1, keepdims=True))
        lam = sg(jnp.linalg.norm(q, axis=-1, keepdims=True) / jnp.linalg.norm(r, axis=-1, keepdims=True))
        along_w, along_u = jnp.sum(r * w, -1, keepdims=True), jnp.sum(r * u, -1, keepdims=True)
        return lam * (r - 2 * along_w * w + 2 * along_u * qh)

    np.testing.assert_allclose(np.asarray(grad_r), np.asarray(jax.vjp(rotate, r)[1](g)[0]), rtol=1e-5,
                               atol=1e-6)
    out, vjp = jax.vjp(straight_through, r, q)
    np.testing.assert_allclose(np.asarray(out), np.asarray(q), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def test_training_needs_key_and_valid_gradient_option():
    model = ResidualVQ(TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 1, TINY.dim)))
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply(variables, jnp.zeros((1, 2, TINY.dim)), True, None, mutable=["codebook"])
    with pytest.raises(ValueError, match="gradient"):
        RVQConfig(gradient="gumbel")


def test_rules_accept_both_initted_layouts():
    model = ResidualVQ(TINY)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, TINY.dim)))
    k, c, q = TINY.codebook_size, TINY.codebook_dim, TINY.num_quantizers
    sd = {"vq_embed.project_in.weight": np.zeros((c, TINY.dim), np.float32),
          "vq_embed.project_in.bias": np.zeros((c,), np.float32),
          "vq_embed.project_out.weight": np.zeros((TINY.dim, c), np.float32),
          "vq_embed.project_out.bias": np.zeros((TINY.dim,), np.float32)}
    for i in range(q):
        p = f"vq_embed.layers.{i}._codebook."
        sd |= {p + "initted": np.ones((1,), np.float32) if i % 2 else np.array(True),
               p + "cluster_size": np.full((1, k), i, np.float32),
               p + "embed_avg": np.zeros((1, k, c), np.float32), p + "embed": np.zeros((1, k, c), np.float32)}
    variables = convert_state_dict(sd, prefixed("vq_embed.", rvq_rules()), expected)
    assert variables["codebook"]["cluster_size"].shape == (q, k)
    np.testing.assert_array_equal(variables["codebook"]["cluster_size"][:, 0], np.arange(q))
