"""Fusion glue (``AudioDiffusion1D.fetch_codes_batch``): three expert streams -> 25 Hz features.

Channels-last throughout::

    whisper  (B, n_len, whisper_dim) 50 Hz --d_conv_whisper (k2 s2)--> (B, n_len//2, whisper_dim)
    wavlm    (B, T_w, wavlm_dim)     50 Hz --d_conv_wavlm (k2 s2)--> cond_fusion_layer_phone --> phone
    bestrq_semantic (B, T_b, bestrq_dim) 25 Hz --cond_fusion_layer_semantic--> semantic
    [bestrq_acoustic ; whisper_ds] (cut to min(T_b, n_len//2)) --cond_fusion_layer_acoustic--> acoustic
    feature_proj([phone ; semantic ; acoustic]) -> (B, T, codec_dim)

Length rule (:func:`fusion_lengths`): the reference concatenates phone (``T_w//2``), semantic (``T_b``) and
acoustic (``min(T_b, n_len//2)``) frames and crashes unless all three are equal. ``compat="release"``
raises a :class:`ValueError` in that case; the default mode trims all three to the shortest, which gives
the reference's result whenever the reference does not crash (e.g. the ``24000k + 240`` segments).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from almtok_jax import mapping
from almtok_jax.compat import Compat, check_compat
from almtok_jax.component import Component, KeyShapes, ReleaseFiles, shape_of, shapes
from almtok_jax.experts import ExpertsConfig
from almtok_jax.experts.musicfm import num_output_frames as musicfm_frames
from almtok_jax.experts.wavlm import num_output_frames as wavlm_frames
from almtok_jax.experts.whisper import whisper_frame_rate, whisper_n_len
from almtok_jax.layers import Conv1d, Linear
from almtok_jax.mapping import Rule

Array = jax.Array
DOWNSAMPLE = 2  # kernel and stride of d_conv_whisper / d_conv_wavlm (50 Hz -> 25 Hz)

@dataclass(frozen=True)
class FusionConfig:
    """Widths of the three expert streams and of the fused features; defaults are the release's."""

    whisper_dim: int = 1024
    wavlm_dim: int = 768
    bestrq_dim: int = 1024
    codec_dim: int = 768


@dataclass(frozen=True)
class FusionLengths:
    """Frame counts of each stream for one segment length (see the module docstring)."""

    bestrq: int
    wavlm: int
    phone: int
    n_len: int
    whisper: int

    @property
    def release_ok(self) -> bool:
        """Whether the reference's concatenation succeeds: ``phone == bestrq <= whisper``."""
        return self.phone == self.bestrq <= self.whisper

    @property
    def fused(self) -> int:
        return min(self.phone, self.bestrq, self.whisper)


def fusion_lengths(num_samples: int, experts: ExpertsConfig) -> FusionLengths:
    """Stream lengths of a ``num_samples`` segment (spec §6.2), each from the expert that produces it.

    ``bestrq`` = :func:`~almtok_jax.experts.musicfm.num_output_frames`, ``wavlm`` =
    :func:`~almtok_jax.experts.wavlm.num_output_frames`, ``n_len`` = :func:`whisper_n_len` at the log-mel's
    encoder frame rate; ``phone = wavlm // 2`` and ``whisper = n_len // 2`` (the two ``k2 s2`` convs). For
    the release: ``N // 960``, ``(ceil(2N/3) + 160 - 400) // 320 + 1``, ``int(N / 24000 * 50)`` <= 1500.
    """
    bestrq = musicfm_frames(num_samples, experts.musicfm)
    wavlm = wavlm_frames(num_samples, experts.wavlm)
    n_len = whisper_n_len(num_samples, experts.wavlm.input_sample_rate, whisper_frame_rate(experts.logmel),
                          experts.whisper.max_source_positions)
    return FusionLengths(bestrq, wavlm, wavlm // DOWNSAMPLE, n_len, n_len // DOWNSAMPLE)


class ExpertFusion(nn.Module):
    """The fusion glue: expert streams (channels-last) -> ``total_feature (B, T, codec_dim)`` at 25 Hz."""

    config: FusionConfig
    compat: Compat = "default"

    @nn.compact
    def __call__(self, whisper: Array, wavlm: Array, bestrq_acoustic: Array, bestrq_semantic: Array) -> Array:
        """``whisper (B, n_len, Dw)``, ``wavlm (B, T_w, Dl)``, ``bestrq_* (B, T_b, Db)`` -> ``(B, T, D)``."""
        c = self.config
        check_compat(self.compat)
        whisper_ds = Conv1d(c.whisper_dim, DOWNSAMPLE, stride=DOWNSAMPLE, name="d_conv_whisper")(whisper)
        wavlm_ds = Conv1d(c.wavlm_dim, DOWNSAMPLE, stride=DOWNSAMPLE, name="d_conv_wavlm")(wavlm)
        t_phone, t_bestrq, t_whisper = wavlm_ds.shape[1], bestrq_semantic.shape[1], whisper_ds.shape[1]
        if bestrq_acoustic.shape[1] != t_bestrq:
            raise ValueError(f"BEST-RQ acoustic ({bestrq_acoustic.shape[1]}) and semantic ({t_bestrq}) "
                             "streams must have the same number of frames")
        if self.compat == "release" and not t_phone == t_bestrq <= t_whisper:
            raise ValueError(
                f"expert streams do not line up (the reference would crash): WavLM gives {t_phone} frames "
                f"after d_conv_wavlm, BEST-RQ {t_bestrq}, Whisper {t_whisper} after d_conv_whisper; release "
                "mode needs WavLM == BEST-RQ <= Whisper (use segments of 24000*k + 240 samples)")
        t = min(t_phone, t_bestrq, t_whisper)
        phone = Linear(c.codec_dim, name="cond_fusion_layer_phone")(wavlm_ds[:, :t])
        semantic = Linear(c.codec_dim, name="cond_fusion_layer_semantic")(bestrq_semantic[:, :t])
        acoustic_in = jnp.concatenate([bestrq_acoustic[:, :t], whisper_ds[:, :t]], axis=-1)
        acoustic = Linear(c.codec_dim, name="cond_fusion_layer_acoustic")(acoustic_in)
        total = jnp.concatenate([phone, semantic, acoustic], axis=-1)
        return Linear(c.codec_dim, name="feature_proj")(total)


def fusion_rules(config: FusionConfig) -> list[Rule]:
    """Top-level ``AudioDiffusion1D`` keys of the glue -> :class:`ExpertFusion` params."""
    del config  # key names do not depend on the size
    rules = []
    for conv in ("d_conv_whisper", "d_conv_wavlm"):
        rules += [Rule(rf"{conv}\.weight", f"params/{conv}/kernel", mapping.conv1d),
                  Rule(rf"{conv}\.bias", f"params/{conv}/bias")]
    for dense in ("cond_fusion_layer_phone", "cond_fusion_layer_semantic", "cond_fusion_layer_acoustic",
                  "feature_proj"):
        rules += [Rule(rf"{dense}\.weight", f"params/{dense}/kernel", mapping.linear),
                  Rule(rf"{dense}\.bias", f"params/{dense}/bias")]
    return rules


def derive_fusion(key_shapes: KeyShapes, base: FusionConfig, files: ReleaseFiles) -> FusionConfig:
    """The stream widths are the input widths of the glue layers, ``codec_dim`` the output of ``feature_proj``."""
    del files

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(key_shapes, key, "fusion")

    return dataclasses.replace(base, whisper_dim=shape("d_conv_whisper.weight")[1],
                               wavlm_dim=shape("d_conv_wavlm.weight")[1],
                               bestrq_dim=shape("cond_fusion_layer_semantic.weight")[1],
                               codec_dim=shape("feature_proj.weight")[0])


FUSION = Component(
    "fusion", frozen=False, config_path="fusion", module=ExpertFusion,
    example_inputs=lambda f: shapes((1, 2, f.whisper_dim), (1, 2, f.wavlm_dim), (1, 1, f.bestrq_dim),
                                    (1, 1, f.bestrq_dim)),
    rules=fusion_rules,
    key_names=("d_conv_whisper", "d_conv_wavlm", "cond_fusion_layer_phone", "cond_fusion_layer_semantic",
               "cond_fusion_layer_acoustic", "feature_proj"),
    derive=derive_fusion)
