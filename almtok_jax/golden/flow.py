"""Golden handlers for the flow decoder: ``dit`` (estimator), ``flow_loss`` (training loss), ``sampler``."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from almtok_jax.flow.cfm import (
    FLOW,
    RELEASE_SAMPLER,
    FlowLossDraws,
    SamplerConfig,
    estimator_variables,
    fill_padding,
    flow_matching_loss,
    incontext_latents,
    inference_masks,
    make_sampler,
    zero_condition,
)
from almtok_jax.flow.dit import (
    ESTIMATOR_PREFIX,
    DiTConfig,
    DiTEstimator,
    block_outputs,
    dit_rules,
    init_shapes,
)
from almtok_jax.golden.configs import dit_config, flow_loss_config, quantizer_config
from almtok_jax.golden.runner import Fixture
from almtok_jax.mapping import convert_state_dict, prefixed
from almtok_jax.quantizer.query import DECODER_PARTS, QUANTIZER, QueryQuantizer


def _cases(fx: Fixture, stem: str) -> list[str]:
    return sorted(k[len(stem) + 1:] for k in fx.inputs if k.startswith(stem + "_"))


def _flow_variables(fx: Fixture, config: DiTConfig) -> dict:
    """Estimator + ``zero_cond_embedding1``; the other components' keys are not read."""
    return FLOW.load(fx.state_dict, config, source=fx.path.name)


def dit(fx: Fixture) -> dict[str, np.ndarray]:
    config = dit_config(fx.config)
    variables = convert_state_dict(fx.state_dict, prefixed(ESTIMATOR_PREFIX, dit_rules(config)),
                                   expected=init_shapes(config), source=fx.path.name)
    model = DiTEstimator(config)
    run = jax.jit(lambda v, h, t: model.apply(v, h, t, mutable=["intermediates"]))
    outputs = {}
    for case in _cases(fx, "hidden"):
        out, state = run(variables, fx.inputs[f"hidden_{case}"], fx.inputs[f"timestep_{case}"])
        inter = state["intermediates"]
        outputs[f"out_{case}"] = out
        for name, key in (("proj_in", "h_proj_in"), ("pos_embed", "h_pos_embed"), ("adaln_e", "adaln_e"),
                          ("adaln_m", "adaln_m")):
            outputs[f"{name}_{case}"] = inter[key][0]
        for j, hidden in enumerate(block_outputs(inter)):
            outputs[f"block{j}_{case}"] = hidden
    return outputs


def flow_loss(fx: Fixture) -> dict[str, np.ndarray]:
    config = dit_config(fx.config)
    loss_config = flow_loss_config(fx.config)
    variables = _flow_variables(fx, config)
    model = DiTEstimator(config)

    @jax.jit
    def run(variables, latents, cond, masks, draws):
        est = estimator_variables(variables)
        return flow_matching_loss(lambda h, t: model.apply(est, h, t), latents, cond, masks,
                                  zero_condition(variables), draws, loss_config)

    outputs = {}
    for case in _cases(fx, "latents"):
        inp = {k[: -len(case) - 1]: v for k, v in fx.inputs.items() if k.endswith("_" + case)}
        b = inp["latents"].shape[0]
        validation = bool(inp["validation_mode"])
        use_prefix = bool(inp["rng_scenario_is_other_seg"])
        draws = FlowLossDraws(
            use_prefix=jnp.asarray(use_prefix),
            prefix_len=jnp.asarray(inp["rng_prefix_len"] if use_prefix else np.zeros(b), jnp.int32),
            cfg_uniform=jnp.asarray(inp["rng_cfg_uniform"]),
            t=jnp.asarray(np.full(b, loss_config.validation_t, np.float32) if validation else inp["rng_t"]),
            z=jnp.asarray(inp["rng_z"]))
        loss, aux = run(variables, inp["latents"], inp["cond"], inp["latent_masks"], draws)
        outputs |= {f"loss_{case}": loss, f"latent_masks_out_{case}": aux["latent_masks"],
                    f"cond_masked_{case}": aux["cond"], f"incontext_latents_{case}": aux["incontext"],
                    f"y_{case}": aux["y"], f"est_timestep_{case}": aux["t"],
                    f"est_out_{case}": aux["velocity"]}
    return outputs


def sampler(fx: Fixture) -> dict[str, np.ndarray]:
    config = dit_config(fx.config)
    sigma_min = fx.config.get("sigma_min", RELEASE_SAMPLER.sigma_min)
    variables = _flow_variables(fx, config)
    est = estimator_variables(variables)
    zero_cond = zero_condition(variables)
    model = DiTEstimator(config)
    # The sampler fixture holds only the quantizer's decoding half (codes → condition).
    q_config = quantizer_config(fx.config)
    q_variables = QUANTIZER.load(fx.state_dict, q_config, source=fx.path.name, names=DECODER_PARTS)
    quantizer = QueryQuantizer(q_config)

    @jax.jit
    def condition(variables, codes):
        quantized = quantizer.apply(variables, codes, method="lookup")
        return quantized, quantizer.apply(variables, quantized, method="decoder_sequence")

    outputs: dict[str, np.ndarray] = {}
    samplers: dict[SamplerConfig, object] = {}  # one compiled sampler per setting
    for case in _cases(fx, "codes"):
        inp = {k[: -len(case) - 1]: v for k, v in fx.inputs.items() if k.endswith("_" + case)}
        quantized, dec = condition(q_variables, jnp.asarray(inp["codes"]).transpose(0, 2, 1))  # (B, N, Q)
        cond = dec["cond"]
        outputs |= {f"quantized_{case}": quantized, f"forward_decoder_{case}": dec["decoder_pred"],
                    f"cond_{case}": cond}
        true_latents = inp["true_latents"]
        b, frames, _ = true_latents.shape
        prompt_len = np.full((b,), int(inp["incontext_length"]))
        masks = inference_masks(frames, np.full((b,), int(inp["latent_length"])), prompt_len)
        mu = fill_padding(jnp.asarray(cond), masks, zero_cond)
        prompt = incontext_latents(jnp.asarray(true_latents), masks)
        sampler_config = replace(RELEASE_SAMPLER, num_steps=int(inp["num_steps"]),
                                 guidance_scale=float(inp["guidance_scale"]), sigma_min=sigma_min)
        run = samplers.setdefault(sampler_config, make_sampler(model, sampler_config, trace=True))
        latents, traj = run(est, mu, prompt, prompt_len, jnp.asarray(inp["rng_noise"]))
        est_batch = traj["est_in0"].shape[0]
        outputs |= {f"mu_{case}": mu, f"incontext_latents_{case}": prompt, f"latents_{case}": latents,
                    f"t_span_{case}": traj["t_span"], f"est_in_step0_{case}": traj["est_in0"]}
        for k in range(sampler_config.num_steps):
            outputs |= {f"x_step{k}_{case}": traj["x"][k], f"v_uncond_step{k}_{case}": traj["v_uncond"][k],
                        f"v_cond_step{k}_{case}": traj["v_cond"][k],
                        f"timestep_step{k}_{case}": jnp.full((est_batch,), traj["t"][k])}
    return outputs
