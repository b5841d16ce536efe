"""Synthetic releases in the reference's file layout (no torch): the key manifest of a release, random
values, written one tensor at a time by :func:`tests.torch_zip.write_reference_checkpoint`. Shared by the
release-derivation tests, the conversion memory test and ``benchmarks/bench_convert.py``.

* :func:`full_size_shapes`: the two state dicts of a full-size release (``release_full_keys``);
* :func:`wide_dit_shapes`: the tiny release with a release-width DiT of a few blocks (a few hundred MB whose
  largest component is, as in the release, the DiT);
* :func:`write_release`: a release folder (``ep5.checkpoint``, ``sqcodec.pth``, ``sq_config.yaml``,
  ``model_config.json``, ``whisper-medium/config.json``) of those shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from almtok_jax.component import DIT_CONFIG, SQ_CONFIG, WHISPER_CONFIG
from almtok_jax.weights.release import read_sq_section
from tests.torch_zip import write_reference_checkpoint

Shapes = dict[str, tuple[int, ...]]

# The release's own files as the spec gives them (01-experts §3.1 whisper-medium, 03-flow-dit §1
# models/model_config.json without num_positional_embeddings, 04-sqcodec-training A.2 sq_config.yaml).
FULL_FILES = {
    WHISPER_CONFIG: {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                     "num_mel_bins": 80, "max_source_positions": 1500, "model_type": "whisper"},
    DIT_CONFIG: {"_class_name": "Transformer1DModel", "activation_fn": "gelu-approximate", "attention_head_dim": 64,
                 "in_channels": 1040, "norm_eps": 1e-6, "norm_type": "ada_norm_single", "num_attention_heads": 24,
                 "num_layers": 32, "out_channels": 136},
    SQ_CONFIG: {"num_bands": 1, "sample_rate": 24000, "causal": True, "num_samples": 1,
                "downsample_factors": [3, 4, 4, 4, 5], "downsample_kernel_sizes": [6, 8, 8, 8, 10],
                "upsample_factors": [5, 4, 4, 4, 3], "upsample_kernel_sizes": [10, 8, 8, 8, 6],
                "latent_hidden_dim": 136, "default_kernel_size": 7, "delay_kernel_size": 5, "init_channel": 64,
                "res_kernel_size": 7},
}
DIT_PREFIX = "cfm_wrapper.estimator."
DIT_BLOCKS = DIT_PREFIX + "transformer_blocks."


def _manifest(path: Path) -> Shapes:
    return {k: tuple(s) for k, s in json.loads(path.read_text()).items()}


def full_size_shapes(fixtures: Path) -> tuple[Shapes, Shapes]:
    """``(ep5.checkpoint['model'], sqcodec.pth['codec_model'])`` names and shapes of a full-size release."""
    folder = fixtures / "release_full_keys"
    return _manifest(folder / "ep5_model_keys.json"), _manifest(folder / "sqcodec_keys.json")


def wide_dit_shapes(fixtures: Path, blocks: int) -> tuple[Shapes, Shapes, dict]:
    """The tiny release with the release's DiT width (24 heads x 64) and ``blocks`` blocks in place of its
    own DiT: ``(model shapes, codec shapes, release files)``. The other components keep the tiny shapes
    (their values come from the tiny release, see :func:`tiny_values`)."""
    from almtok_jax.weights.torch_io import open_state_dict

    tiny = fixtures / "release_tiny"
    model = {k: t.shape for k, t in open_state_dict(tiny / "ep5.checkpoint", select="model").items()}
    codec = {k: t.shape for k, t in open_state_dict(tiny / "sqcodec.pth", select="codec_model").items()}
    full, _ = full_size_shapes(fixtures)
    tiny_in = model[DIT_PREFIX + "proj_in.ffn_1.weight"][1]
    model = {k: s for k, s in model.items() if not k.startswith(DIT_PREFIX)}
    for key, shape in full.items():
        if key.startswith(DIT_BLOCKS) and int(key[len(DIT_BLOCKS):].split(".")[0]) >= blocks:
            continue
        if key.startswith(DIT_PREFIX):
            model[key] = (shape[0], tiny_in, *shape[2:]) if key == DIT_PREFIX + "proj_in.ffn_1.weight" else shape
    dit = json.loads((tiny / DIT_CONFIG).read_text())
    files = {SQ_CONFIG: read_sq_section(tiny / SQ_CONFIG),
             DIT_CONFIG: {**dit, "num_attention_heads": FULL_FILES[DIT_CONFIG]["num_attention_heads"],
                          "num_layers": blocks},
             WHISPER_CONFIG: json.loads((tiny / WHISPER_CONFIG).read_text())}
    return model, codec, files


def tiny_values(fixtures: Path) -> dict[str, np.ndarray]:
    """Every tensor of the tiny release (model and SQ codec), by key."""
    from almtok_jax.weights.torch_io import load_state_dict

    tiny = fixtures / "release_tiny"
    return {**load_state_dict(tiny / "ep5.checkpoint", select="model"),
            **load_state_dict(tiny / "sqcodec.pth", select="codec_model")}


def release_rope(fixtures: Path) -> dict[str, np.ndarray]:
    """The query transformers' RoPE buffers as the reference made them (torch's float32 tables, which
    conversion checks against the config by key suffix): ``release_rope64``'s, rotary dim 64 as the release."""
    from almtok_jax.weights.torch_io import open_state_dict

    state = open_state_dict(fixtures / "release_rope64" / "ep5.checkpoint", select="model")
    return {"rope.inv_freq": np.asarray(state["encoder_transformers.0.rope.inv_freq"].read(), np.float32)}


class Values:
    """Tensor values for :func:`write_release`: ``known[name]`` where given (also by key suffix, for
    buffers conversion checks), int64 zeros for batch-norm counters, else N(0, 0.02^2) float32 from
    ``seed`` (one generator, so the same shapes in the same order give the same values)."""

    def __init__(self, seed: int = 0, known: Mapping[str, np.ndarray] | None = None):
        self.rng = np.random.default_rng(seed)
        self.known = dict(known or {})

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        for key, value in self.known.items():
            if (name == key or name.endswith("." + key)) and value.shape == shape:
                return value
        if name.endswith("num_batches_tracked"):
            return np.zeros(shape, np.int64)
        out = self.rng.standard_normal(shape, np.float32)
        out *= 0.02
        return out


def write_release(folder: Path, model: Shapes, codec: Shapes, files: dict, values: Values) -> int:
    """A release folder with state dicts of the given shapes; returns the bytes of tensor data written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "whisper-medium").mkdir(exist_ok=True)
    (folder / SQ_CONFIG).write_text(yaml.safe_dump({"generator": {"config": files[SQ_CONFIG]}}))
    (folder / DIT_CONFIG).write_text(json.dumps(files[DIT_CONFIG]))
    (folder / WHISPER_CONFIG).write_text(json.dumps(files[WHISPER_CONFIG]))
    written = write_reference_checkpoint(folder / "ep5.checkpoint", {"model": model}, values)
    return written + write_reference_checkpoint(folder / "sqcodec.pth", {"codec_model": codec}, values)
