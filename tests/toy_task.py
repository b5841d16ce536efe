"""The training tests' stand-in task: a tiny conv autoencoder on the waveform with an EMA codebook.

Used by ``tests/test_train_infra.py`` (``toy_task()``) and by ``configs/train_toy.yaml``
(``model: tests.toy_task:toy_task``, :func:`almtok_jax.train.task.build_task` calls it with the train
config). Runs in seconds on CPU. Its metrics are ``loss_recon`` (normalised reconstruction MSE) and
``loss_commit`` (codebook commitment).
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from almtok_jax.layers import Conv1d, ConvTranspose1d, LayerNorm, Linear
from almtok_jax.quantizer.rvq import nearest_code
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.state import Batch, Params, Task


@dataclass(frozen=True)
class ToyConfig:
    hop: int = 16
    channels: int = 32
    latent: int = 8
    codebook_size: int = 16
    ema_decay: float = 0.9
    commit_weight: float = 0.25


class ToyEncoder(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, wav: jax.Array) -> jax.Array:
        """``(B, S)`` -> latents ``(B, S / hop, latent)``."""
        c = self.config
        x = Conv1d(c.channels, 2 * c.hop, stride=c.hop, padding=c.hop // 2, name="conv")(wav[..., None])
        x = LayerNorm(name="post_norm")(jnp.tanh(x))
        return Linear(c.latent, name="proj")(x)


class ToyDecoder(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """``(B, T, latent)`` -> ``(B, T * hop)``."""
        c = self.config
        x = jnp.tanh(Linear(c.channels, name="proj")(z))
        return ConvTranspose1d(1, 2 * c.hop, stride=c.hop, padding=c.hop // 2, name="deconv")(x)[..., 0]


def toy_task(train_config: TrainConfig | None = None, config: ToyConfig = ToyConfig()) -> Task:
    """Waveform autoencoder; the codebook (``extra["codebook"]["embed"]``) follows an EMA of its assigned
    latents. ``train_config`` is accepted (the :func:`build_task` factory signature) and unused."""
    del train_config
    encoder, decoder = ToyEncoder(config), ToyDecoder(config)

    def init_fn(rng: jax.Array, batch: Batch) -> tuple[Params, Params, Params]:
        k_enc, k_dec, k_code = jax.random.split(rng, 3)
        wav = batch["wav"]
        enc = encoder.init(k_enc, wav)["params"]
        z = jax.eval_shape(encoder.apply, {"params": enc}, wav)
        dec = decoder.init(k_dec, jnp.zeros(z.shape, z.dtype))["params"]
        embed = 0.1 * jax.random.normal(k_code, (config.codebook_size, config.latent))
        return {"encoder": enc, "decoder": dec}, {}, {"codebook": {"embed": embed}}

    def snap(z: jax.Array, embed: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Nearest codebook vector of each latent: ``(vectors, codes)``."""
        flat = jax.lax.stop_gradient(z).astype(jnp.float32).reshape(-1, config.latent)
        codes = nearest_code(flat, embed).reshape(z.shape[:-1])
        return embed[codes], codes

    def loss_fn(trainable: Params, frozen: Params, extra: Params, batch: Batch, rng: jax.Array):
        del frozen, rng
        wav = batch["wav"]
        embed = extra["codebook"]["embed"]
        z = encoder.apply({"params": trainable["encoder"]}, wav.astype(jax.tree.leaves(trainable)[0].dtype))
        q, codes = snap(z, embed)
        commit = jnp.mean((z.astype(jnp.float32) - q) ** 2)
        z_st = z + jax.lax.stop_gradient(q.astype(z.dtype) - z)
        wav_hat = decoder.apply({"params": trainable["decoder"]}, z_st).astype(jnp.float32)
        recon = jnp.mean((wav_hat - wav) ** 2) / (jnp.mean(wav**2) + 1e-5)
        onehot = jax.nn.one_hot(codes.reshape(-1), config.codebook_size)
        counts = onehot.sum(0)
        means = (onehot.T @ jax.lax.stop_gradient(z).reshape(-1, config.latent).astype(jnp.float32)) / \
            jnp.maximum(counts, 1.0)[:, None]
        target = jnp.where(counts[:, None] > 0, means, embed)
        new_embed = config.ema_decay * embed + (1 - config.ema_decay) * target
        loss = recon + config.commit_weight * commit
        return loss, ({"loss_recon": recon, "loss_commit": commit}, {"codebook": {"embed": new_embed}})

    def reconstruct_fn(trainable: Params, frozen: Params, extra: Params, wav: jax.Array,
                       rng: jax.Array) -> jax.Array:
        z = encoder.apply({"params": trainable["encoder"]}, wav)
        q, _ = snap(z, extra["codebook"]["embed"])
        return decoder.apply({"params": trainable["decoder"]}, q)

    return Task(init_fn=init_fn, loss_fn=loss_fn, reconstruct_fn=reconstruct_fn)
