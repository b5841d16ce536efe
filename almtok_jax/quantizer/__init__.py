"""The query-based quantizer: transformer blocks, query interleaving, residual VQ, decoders."""

from almtok_jax.quantizer.gpt import CodePredictor, GPTLossConfig, gpt_loss, next_code_loss
from almtok_jax.quantizer.pronunciation import (
    PronunciationConfig,
    PronunciationDecoder,
    phone_loss,
    pronunciation_rules,
)
from almtok_jax.quantizer.query import (
    QuantizerConfig,
    QueryQuantizer,
    dequantize,
    encode_codes,
    extract_frames,
    extract_queries,
    interleave_masks,
    interleave_queries,
    quantizer_rules,
    train_forward,
)
from almtok_jax.quantizer.rvq import ResidualVQ, RVQConfig, rotation_trick, rvq_rules
from almtok_jax.quantizer.transformer import (
    BlockConfig,
    TransformerBlock,
    TransformerStack,
    check_rope_buffers,
    rope_inv_freq,
    transformer_stack_rules,
)

__all__ = [
    "BlockConfig", "CodePredictor", "GPTLossConfig", "PronunciationConfig", "PronunciationDecoder",
    "QuantizerConfig", "QueryQuantizer", "RVQConfig", "ResidualVQ", "TransformerBlock", "TransformerStack",
    "check_rope_buffers", "dequantize", "encode_codes", "extract_frames", "extract_queries", "gpt_loss",
    "interleave_masks", "interleave_queries", "next_code_loss", "phone_loss",
    "pronunciation_rules", "quantizer_rules", "rope_inv_freq", "rotation_trick", "rvq_rules",
    "train_forward", "transformer_stack_rules",
]
