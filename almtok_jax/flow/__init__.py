"""Flow-matching decoder: the DiT estimator (:mod:`.dit`), its training loss and samplers (:mod:`.cfm`)."""

from almtok_jax.flow.cfm import (
    FLOW,
    ConditionalFlow,
    FlowLossConfig,
    FlowLossDraws,
    SamplerConfig,
    cfm_rules,
    estimator_variables,
    fill_padding,
    flow_matching_loss,
    incontext_latents,
    inference_masks,
    make_sampler,
    sample,
    sample_loss_draws,
    zero_condition,
)
from almtok_jax.flow.dit import ESTIMATOR_PREFIX, DiTConfig, DiTEstimator, dit_rules, init_shapes

__all__ = [
    "FLOW", "ConditionalFlow", "DiTConfig", "DiTEstimator", "ESTIMATOR_PREFIX", "FlowLossConfig", "FlowLossDraws",
    "SamplerConfig",
    "cfm_rules", "dit_rules", "estimator_variables", "fill_padding", "flow_matching_loss",
    "incontext_latents", "inference_masks", "init_shapes", "make_sampler", "sample",
    "sample_loss_draws", "zero_condition",
]
