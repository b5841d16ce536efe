"""The distillation task: a few-step, guidance-baked student of a model directory's flow decoder.

Selected by ``model: almtok_jax.train.distill:distill_task`` (``configs/distill_*.yaml``); the teacher is
the model directory ``frozen_from`` (``trainable_init`` names the same directory: the student starts as
its flow decoder, with the step embedding at zero, so it starts equal to the teacher at ``d = 0``). The
objective is :mod:`almtok_jax.flow.shortcut`; its settings are ``TrainConfig.distill``.

Variable trees: ``trainable`` = ``{"flow": {"params"}}`` (the student); ``extra`` = ``{"flow":
{"buffers"}}`` (its position table); ``frozen`` = every component of the teacher (experts, fusion,
quantizer, SQ codec) with the teacher's flow decoder under ``teacher``. One step on a batch ``wav (B, S)``:
the frozen encoder gives the codes and the condition as at inference (dequantized codes), the SQ codec the
clean latents of the in-context prompt (drawn as in the flow loss: half the batches get a prefix of
``prefix_min..prefix_max`` frames, at most ``T − 1``); the teacher samples from fresh noise with guidance,
the student learns its flow map. ``train.py --export`` writes a model directory: the teacher's components
with the student as the flow decoder, ``dit.step_embedding: true`` and ``sampler: {solver: shortcut,
num_steps: export_steps, guidance: baked}``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from almtok_jax.config import ALMTokenizer2Config, load_model_config, to_dict
from almtok_jax.flow.cfm import (
    PROMPT,
    SamplerConfig,
    estimator_variables,
    fill_padding,
    incontext_latents,
    prompt_mask,
    sample,
    sample_loss_draws,
)
from almtok_jax.flow.dit import DiTEstimator
from almtok_jax.flow.shortcut import distillation_loss
from almtok_jax.model import abstract_variables, condition, encode_segments, init_variables
from almtok_jax.sqcodec import SQCodec
from almtok_jax.train.config import DistillConfig, TrainConfig
from almtok_jax.train.state import Batch, Params, Task
from almtok_jax.train.task import REMAT_POLICY, directory_variables, latent_masks
from almtok_jax.weights.model_dir import merge_variables, save_model_dir, split_variables

Array = jax.Array
TEACHER = "teacher"  # the frozen tree's name of the teacher's flow decoder


def student_config(teacher: ALMTokenizer2Config, distill: DistillConfig) -> ALMTokenizer2Config:
    """The exported model's config: the teacher's, with the step embedding and the student's sampler."""
    sampler = SamplerConfig(num_steps=distill.export_steps, guidance_scale=distill.guidance_scale,
                            solver="shortcut", sigma_min=teacher.sampler.sigma_min, guidance="baked")
    return replace(teacher, dit=replace(teacher.dit, step_embedding=True), sampler=sampler)


def teacher_trajectory(teacher_vars: dict, cond: Array, prompt: Array, prompt_len: Array, x0: Array,
                       config: ALMTokenizer2Config, distill: DistillConfig) -> tuple[Array, Array, Array]:
    """The teacher's guided sampler on a uniform ``teacher_steps`` grid: ``(states (N+1, B, T, C),
    t_span (N+1,), guided velocity at the first N states (N, B, T, C))``, no gradients."""
    sampler = SamplerConfig(num_steps=distill.teacher_steps, guidance_scale=distill.guidance_scale,
                            solver=distill.teacher_solver, sigma_min=config.sampler.sigma_min)
    estimator, est_vars = DiTEstimator(replace(config.dit, remat_policy=None)), estimator_variables(teacher_vars)
    x1, trace = sample(lambda h, t: estimator.apply(est_vars, h, t), cond, prompt, prompt_len, x0, sampler,
                       trace=True)
    g = distill.guidance_scale
    guided = trace["v_uncond"] + g * (trace["v_cond"] - trace["v_uncond"])
    states = jnp.concatenate([trace["x"], x1[None]])
    return jax.lax.stop_gradient((states, trace["t_span"], guided))


def distill_loss(trainable: Params, frozen: Params, extra: Params, batch: Batch, rng: Array,
                 teacher: ALMTokenizer2Config, student: ALMTokenizer2Config, distill: DistillConfig
                 ) -> tuple[Array, tuple[dict[str, Array], Params]]:
    """The :data:`~almtok_jax.train.state.LossFn` of the distillation (module docstring)."""
    wav, length = batch["wav"], batch["length"]
    if wav.ndim != 2 or length.shape != wav.shape[:1]:
        raise ValueError(f"batch must hold wav (B, S) and length (B,), got {wav.shape} and {length.shape}")
    model = {**{k: v for k, v in frozen.items() if k != TEACHER}, "flow": frozen[TEACHER]}
    codes = encode_segments(model, wav, teacher)["codes"]
    cond = condition(model, codes, teacher).astype(jnp.float32)
    latents = SQCodec(teacher.sqcodec).apply(model["sqcodec"], wav[..., None], method=SQCodec.encode)
    frames = min(cond.shape[1], latents.shape[1])
    cond, latents = cond[:, :frames], latents[:, :frames].astype(jnp.float32)
    k_draw, k_pick = jax.random.split(rng)
    draws = sample_loss_draws(k_draw, latents.shape, teacher.flow_loss)
    prompt_len = jnp.where(draws.use_prefix, jnp.minimum(draws.prefix_len, frames - 1), 0)
    masks = latent_masks(length, frames, teacher.sqcodec.hop_length)
    masks = jnp.where(prompt_mask(frames, prompt_len), PROMPT, masks)
    mu = fill_padding(cond, masks, frozen[TEACHER]["params"]["zero_cond_embedding1"])
    prompt = incontext_latents(latents, masks)
    states, t_span, guided = teacher_trajectory(frozen[TEACHER], mu, prompt, prompt_len, draws.z, teacher, distill)

    estimator = DiTEstimator(student.dit)
    student_vars = estimator_variables(merge_variables({"trainable": trainable, "extra": extra})["flow"])
    loss, metrics = distillation_loss(lambda h, t, step: estimator.apply(student_vars, h, t, step), states, t_span,
                                      guided, prompt, mu, masks, distill.levels, k_pick,
                                      teacher.flow_loss.padding_weight)
    return loss, (metrics, extra)


def distill_task(train: TrainConfig) -> Task:
    """The distillation :class:`Task` for ``train.frozen_from`` (the teacher's model directory)."""
    if train.frozen_from == "random" or train.trainable_init == "random":
        raise ValueError("distillation needs a teacher: set frozen_from and trainable_init to its model directory")
    teacher = load_model_config(Path(train.frozen_from) / "config.yaml")
    student = student_config(teacher, train.distill)
    if train.remat:
        student = replace(student, dit=replace(student.dit, remat_policy=REMAT_POLICY))
    fresh_student = abstract_variables(student, ("flow",))["flow"]

    def trees(model: dict, student_flow: dict) -> tuple[Params, Params, Params]:
        frozen = {**{k: v for k, v in model.items() if k != "flow"}, TEACHER: model["flow"]}
        return ({"flow": {"params": student_flow["params"]}}, frozen,
                {"flow": {k: v for k, v in student_flow.items() if k != "params"}})

    def init_fn(rng: Array, batch: Batch) -> tuple[Params, Params, Params]:
        del batch  # variable shapes do not depend on the segment length
        k_teacher, k_student = jax.random.split(rng)
        return trees(init_variables(teacher, k_teacher), init_variables(student, k_student, ("flow",))["flow"])

    def load_fn(directory: str, part: str) -> tuple[Params, Params, Params]:
        model = directory_variables(directory, teacher)
        # the student is the teacher's flow decoder plus the zero-initialised step embedding
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh_student)
        adaln = {**model["flow"]["params"]["estimator"]["adaln_single"],
                 "step_embedder": zeros["params"]["estimator"]["adaln_single"]["step_embedder"]}
        flow = {**model["flow"], "params": {**model["flow"]["params"], "estimator": {
            **model["flow"]["params"]["estimator"], "adaln_single": adaln}}}
        return trees(model, flow)

    def loss_fn(trainable, frozen, extra, batch, rng):
        return distill_loss(trainable, frozen, extra, batch, rng, teacher, student, train.distill)

    def export_fn(directory: str, trainable: Params, frozen: Params, extra: Params, force: bool = False) -> None:
        teacher_parts = {k: v for k, v in frozen.items() if k != TEACHER}
        variables = merge_variables({"frozen": teacher_parts, "trainable": trainable, "extra": extra})
        config_text = yaml.safe_dump(to_dict(replace(student, dit=replace(student.dit, remat_policy=None))),
                                     sort_keys=False)
        save_model_dir(directory, split_variables(variables), config_text, force=force)

    return Task(init_fn=init_fn, loss_fn=loss_fn, load_fn=load_fn, export_fn=export_fn)
