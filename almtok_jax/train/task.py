"""The ALMTokenizer2 training task: ``L = L_flow + L_commit + 0.5 · L_phone`` (spec 02 §8, 03 §4, 04 B.6).

Variable trees of the :class:`~almtok_jax.train.state.Task` (component names as in :mod:`almtok_jax.model`):

* ``trainable``: the ``params`` collection of ``fusion``, ``quantizer`` and ``flow`` (the optimizer's tree);
* ``frozen``: the whole ``whisper``, ``wavlm``, ``musicfm`` and ``sqcodec`` components (== the ``frozen``
  part of a model directory);
* ``extra``: every other collection of the trained components: ``quantizer/codebook`` (RVQ EMA state,
  replaced by the loss function's output) and ``flow/buffers`` (the DiT position table, passed through).

:func:`~almtok_jax.weights.model_dir.merge_variables` merges the three back into the model's variables;
:func:`task_trees` splits them.

One training step on a batch ``wav (B, S)`` at 24 kHz with ``length (B,)`` valid samples: the frozen
experts (Whisper log-mel on device, WavLM, MusicFM; no gradients) and the trainable fusion give the 25 Hz
features; the frozen SQ codec encodes the waveform into the target latents ``(B, T, C)`` (un-quantized);
the quantizer's training forward (EMA codebook update, rotation trick) gives ``cond``, the commitment loss
and the pronunciation loss against the WavLM mean feature of the same expert pass; the DiT flow-matching
loss runs on ``cond`` and the latents with masks 2 on the first ``length // hop`` frames and 0 after.

Deviations (documented): the cond / latent frame counts are cut to the shorter of the two (equal for
segments of ``48000·k`` samples); in-context prefix lengths are capped at ``T − 1`` frames so that a
sample always keeps a target frame (never active for the reference's 12 s segments); the flow loss is
normalised by the global ``Σw`` of the batch by default (``loss_normalization: per_device`` normalises per device, as
the reference does per GPU); experts run in eval mode.
The optional GPT loss (``quantizer.gpt_loss``) adds a trained next-code predictor (component ``gpt``).

Weight decay (``param_names``): the Flax paths already agree with the reference names on the one rule that
matters (substring ``"norm"``): only ``q_norm_*`` / ``k_norm_*`` of the query transformers contain it, as in
the reference, where ``pre_norm``/``ff_norm`` are identities and no DiT parameter is named ``*norm*``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp

from almtok_jax.config import ALMTokenizer2Config, load_model_config
from almtok_jax.flow.cfm import estimator_variables, flow_matching_loss, sample_loss_draws, zero_condition
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.model import (
    FROZEN,
    components,
    decode_latents,
    encode_segments,
    expert_streams,
    fused_features,
    generate_latents,
    init_variables,
)
from almtok_jax.quantizer.gpt import code_predictor, gpt_loss
from almtok_jax.quantizer.query import train_forward
from almtok_jax.sqcodec import sq_encode
from almtok_jax.train.config import TrainConfig
from almtok_jax.train.state import Batch, Params, Task, path_names
from almtok_jax.weights.model_dir import check_model, load_model, merge_variables

Array = jax.Array

RECONSTRUCT_STEPS = 8  # sampler steps of the training-time audio samples
REMAT_POLICY = "nothing_saveable"


# ------------------------------------------------------------------------------------------- variables


def task_trees(variables: Mapping) -> tuple[dict, dict, dict]:
    """Model variables -> ``(trainable, frozen, extra)`` (the module docstring's layout)."""
    frozen = {k: dict(v) for k, v in variables.items() if k in FROZEN}
    trained = [k for k in variables if k not in FROZEN]
    trainable = {k: {"params": variables[k]["params"]} for k in trained}
    extra = {k: {c: v for c, v in variables[k].items() if c != "params"} for k in trained}
    return trainable, frozen, {k: v for k, v in extra.items() if v}


def directory_variables(directory: str | Path, config: ALMTokenizer2Config,
                        names: tuple[str, ...] | None = None) -> dict:
    """Model variables (NumPy) of a model directory (``convert_torch_weights.py`` or a training export) for
    the components ``names`` (default: all): its own config checked against its weights
    (:func:`~almtok_jax.weights.model_dir.load_model`), then the weights against the training model ``config``."""
    variables, _ = load_model(directory)
    check_model(variables, config, f"{directory} (for the training model config)", names)
    return {k: v for k, v in variables.items() if names is None or k in names}


# ------------------------------------------------------------------------------------------------ loss


def latent_masks(length: Array, frames: int, hop: int) -> Array:
    """``(B,)`` valid samples -> ``(B, T)`` int32 masks: 2 on the first ``length // hop`` frames, else 0."""
    return jnp.where(jnp.arange(frames)[None] < (length // hop)[:, None], 2, 0).astype(jnp.int32)


def training_loss(trainable: Params, frozen: Params, extra: Params, batch: Batch, rng: Array,
                  config: ALMTokenizer2Config, loss_groups: int = 1) -> tuple[Array, tuple[dict[str, Array], Params]]:
    """The :data:`~almtok_jax.train.state.LossFn` of ALMTokenizer2 (module docstring); the flow loss is
    normalised per group of ``B / loss_groups`` rows (one group per device: the reference's per-GPU loss)."""
    wav, length = batch["wav"], batch["length"]
    if wav.ndim != 2 or length.shape != wav.shape[:1]:
        raise ValueError(f"batch must hold wav (B, S) and length (B,), got {wav.shape} and {length.shape}")
    variables = merge_variables({"trainable": trainable, "frozen": frozen, "extra": extra})
    k_vq, k_flow = jax.random.split(rng)
    streams = expert_streams(variables, wav, config)
    features, wavlm = fused_features(variables, streams, config), streams[1]
    latents = jax.lax.stop_gradient(sq_encode(frozen["sqcodec"], wav.astype(features.dtype), config.sqcodec))
    latents = latents.astype(jnp.float32)
    out, codebook = train_forward(trainable["quantizer"]["params"], extra["quantizer"]["codebook"], features,
                                  config.quantizer, k_vq, wavlm_target=wavlm)
    frames = min(out["cond"].shape[1], latents.shape[1])
    cond, latents = out["cond"][:, :frames].astype(jnp.float32), latents[:, :frames]
    masks = latent_masks(length, frames, config.sqcodec.hop_length)
    draws = sample_loss_draws(k_flow, latents.shape, config.flow_loss)
    draws = replace(draws, prefix_len=jnp.minimum(draws.prefix_len, frames - 1))
    estimator = DiTEstimator(config.dit)
    est_vars = estimator_variables(variables["flow"])
    loss_flow, _ = flow_matching_loss(lambda h, t: estimator.apply(est_vars, h, t), latents, cond, masks,
                                      zero_condition(variables["flow"]), draws, config.flow_loss,
                                      loss_groups)
    loss_commit = out["commit_loss"].astype(jnp.float32)
    loss_phone = out["phone_loss"].astype(jnp.float32)
    loss = loss_flow + loss_commit + config.quantizer.pronunciation.loss_weight * loss_phone
    metrics = {"loss_flow": loss_flow, "loss_commit": loss_commit, "loss_phone": loss_phone}
    if config.quantizer.gpt_loss.enabled:
        loss_gpt = gpt_loss(code_predictor(config.quantizer), trainable["gpt"]["params"], out["quantized"],
                            out["codes"])
        loss = loss + loss_gpt
        metrics["loss_gpt"] = loss_gpt
    return loss, (metrics, {**extra, "quantizer": {**extra["quantizer"], "codebook": codebook}})


def reconstruct(trainable: Params, frozen: Params, extra: Params, wav: Array, rng: Array,
                config: ALMTokenizer2Config, steps: int = RECONSTRUCT_STEPS) -> Array:
    """Audio samples: ``(B, S)`` -> encode -> codes -> ``steps``-step sampler (no prompt) -> SQ decode ->
    ``(B, S)`` (cut or zero-padded to the input length)."""
    variables = merge_variables({"trainable": trainable, "frozen": frozen, "extra": extra})
    codes = encode_segments(variables, wav, config)["codes"]
    frames = config.quantizer.interval * codes.shape[1]
    b = wav.shape[0]
    x0 = jax.random.normal(rng, (b, frames, config.dit.out_channels), jnp.float32)
    latents = generate_latents(variables, codes, jnp.zeros_like(x0), jnp.zeros((b,), jnp.int32), x0, config,
                               replace(config.sampler, num_steps=steps))
    out = decode_latents(variables, latents, config)[:, : wav.shape[1]]
    return jnp.pad(out, ((0, 0), (0, wav.shape[1] - out.shape[1])))


# ------------------------------------------------------------------------------------------------ task


def training_model_config(model_config_path: str | Path, train_config: TrainConfig) -> ALMTokenizer2Config:
    """The model preset, with DiT block rematerialisation when ``train_config.remat`` asks for it."""
    config = load_model_config(model_config_path)
    if train_config.remat and config.dit.remat_policy is None:
        config = replace(config, dit=replace(config.dit, remat_policy=REMAT_POLICY))
    return config


def train_task(model_config_path: str | Path, train_config: TrainConfig) -> Task:
    """The :class:`Task` of ALMTokenizer2 for a model preset: ``init_fn`` gives every component's variables
    from the modules' own initializers, ``load_fn(directory, part)`` those of a model directory (host arrays,
    checked against the preset): ``part="frozen"`` the frozen components, ``"trainable"`` the trained ones a
    model directory holds (not the GPT-loss predictor, which only training makes)."""
    config = training_model_config(model_config_path, train_config)

    def init_fn(rng: Array, batch: Batch) -> tuple[Params, Params, Params]:
        del batch  # variable shapes do not depend on the segment length
        return task_trees(init_variables(config, rng))

    def load_fn(directory: str, part: str) -> tuple[Params, Params, Params]:
        names = tuple(c.name for c in components(config)
                      if (c.frozen if part == "frozen" else not c.frozen and c.source is not None))
        return task_trees(directory_variables(directory, config, names))

    # per_device: one loss group per batch shard (the batch is split over every device but the tensor axis)
    groups = jax.device_count() // train_config.mesh.tensor if train_config.loss_normalization == "per_device" else 1

    def loss_fn(trainable, frozen, extra, batch, rng):
        return training_loss(trainable, frozen, extra, batch, rng, config, groups)

    def reconstruct_fn(trainable, frozen, extra, wav, rng):
        return reconstruct(trainable, frozen, extra, wav, rng, config)

    return Task(init_fn=init_fn, loss_fn=loss_fn, reconstruct_fn=reconstruct_fn, param_names=path_names,
                load_fn=load_fn)


def is_task_reference(model: str) -> bool:
    """Whether ``TrainConfig.model`` names a task factory (``"package.module:function"``), not a preset."""
    module, sep, function = model.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and function.isidentifier()


def build_task(model: str | Task, config: TrainConfig) -> Task:
    """The training task: a :class:`Task` as is; ``"package.module:function"`` -> ``function(config)``
    (a task defined outside the package, e.g. the tests' ``tests.toy_task:toy_task``; the module is
    imported, so the name is trusted like the command line); otherwise a model preset path ->
    :func:`train_task`."""
    if isinstance(model, Task):
        return model
    if is_task_reference(model):
        module, _, function = model.partition(":")
        task = getattr(importlib.import_module(module), function)(config)
        if not isinstance(task, Task):
            raise TypeError(f"{model} returned {type(task).__name__}, not a Task")
        return task
    return train_task(model, config)
