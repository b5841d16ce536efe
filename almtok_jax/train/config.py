"""The training configuration tree (spec ``04-sqcodec-training.md`` PART B).

Defaults are the reference recipe (``run.sh`` of the PyTorch trainer): 12 s segments, 64 clips per update,
AdamW(0.9, 0.95, eps 1e-8), lr 1e-4, weight decay 0.05 except on names containing ``"norm"``, cosine
schedule with 3 % linear warmup to 0, clip 2.0, 5 epochs, fp32. ``configs/train_almtokenizer2.yaml``
spells them out; ``configs/train_tiny.yaml`` and ``configs/train_toy.yaml`` are CPU-sized.
:func:`load_train_config` reads one (a YAML file or a shipped preset's name) with every value type-checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from almtok_jax.audio import SAMPLE_RATE
from almtok_jax.config import from_dict, override, preset_path, read_yaml


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline. ``train`` / each entry of ``validation``: a 4-column list file or an audio folder."""

    train: str = ""
    sample_rate: int = SAMPLE_RATE
    segment_seconds: float = 12.0
    crop: Literal["random", "start"] = "random"  # "start" = the reference (first S seconds only)
    global_batch_size: int = 64  # clips per optimizer step over all hosts (16 per GPU x 4 upstream)
    loudness_target_lufs: float = -16.0
    loudness_jitter_lu: float = 3.0  # target drawn from U(-jitter, +jitter) around the target
    loudness_energy_threshold: float = 1e-6
    normalize_loudness: bool = True
    shuffle: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    extensions: tuple[str, ...] = ("wav", "flac", "ogg")

    @property
    def segment_samples(self) -> int:
        return int(round(self.segment_seconds * self.sample_rate))


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a name-based decay mask: leaves whose (reference) name contains a ``no_decay`` substring
    get no weight decay."""

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    no_decay: tuple[str, ...] = ("norm",)
    clip_norm: float = 2.0  # global L2 norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per update (gradients averaged)


@dataclass(frozen=True)
class ScheduleConfig:
    """``lr(c) = lr * lambda(c)``, ``c`` = updates so far (skipped ones included, like the reference).

    ``warmup_steps`` (if set) wins over ``warmup_fraction`` (the reference uses ``int(0.03 * S)``).
    ``total_steps`` is the schedule horizon; ``None`` = ``TrainConfig.total_steps(dataset_size)``.
    """

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.03
    warmup_steps: int | None = None
    total_steps: int | None = None
    end_lr_fraction: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``("data", "fsdp", "tensor")``; one size may be -1 (= the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class ShardingConfig:
    """``fsdp``: every large leaf is split over the ``fsdp`` axis (largest divisible dimension);
    ``replicated``: everything replicated (pure data parallel)."""

    mode: Literal["fsdp", "replicated"] = "fsdp"
    min_shard_size: int = 2**14  # leaves with fewer elements stay replicated
    frozen: Literal["fsdp", "replicated"] = "fsdp"
    extra: Literal["fsdp", "replicated"] = "replicated"  # e.g. the RVQ codebook EMA collection


@dataclass(frozen=True)
class PrecisionConfig:
    param_dtype: Literal["float32"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    matmul_precision: Literal["default", "high", "highest"] = "default"


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 100  # console / TensorBoard / metrics.jsonl interval (steps)
    tensorboard: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 5000
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 0  # 0 = never (the reference never validates)
    lists: tuple[str, ...] = ()
    batches: int = 8  # batches per list per validation pass
    samples_every: int = 0  # write reconstructions as audio every N steps (0 = never)
    num_samples: int = 2


@dataclass(frozen=True)
class DistillConfig:
    """The few-step student of ``model: almtok_jax.train.distill:distill_task`` (its teacher: ``frozen_from``).

    Per update the teacher integrates the guided flow (``guidance_scale``) from fresh noise with
    ``teacher_solver`` in ``teacher_steps`` steps; the student learns, for every entry ``n`` of ``levels``,
    one random step of the uniform ``n``-step grid of that trajectory (``0``: the guided velocity itself).
    ``export_steps``: the step count the exported model directory samples with.
    """

    levels: tuple[int, ...] = (0, 1, 2, 4)
    teacher_solver: Literal["euler", "midpoint", "heun", "rk4"] = "rk4"
    teacher_steps: int = 8
    guidance_scale: float = 1.5
    export_steps: int = 2

    def __post_init__(self) -> None:
        bad = [n for n in self.levels if n < 0 or (n and self.teacher_steps % n)]
        if not self.levels or bad:
            raise ValueError(f"distill.levels {list(self.levels)}: each must be 0 or divide distill.teacher_steps "
                             f"{self.teacher_steps}")
        if self.export_steps < 1:
            raise ValueError(f"distill.export_steps must be >= 1, got {self.export_steps}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the model preset (``model``) and its weights.

    ``model``: the name of a shipped model preset (``tiny_release``), the path of a preset YAML, or a
    ``"module:function"`` task factory (the tests' stand-in task ``tests.toy_task:toy_task``).
    ``frozen_from``: where the frozen parts (Whisper, WavLM, MusicFM, SQ codec) come from: a model directory
    (``convert_torch_weights.py`` or ``train.py --export``), or ``"random"`` (tests and the toy only).
    ``trainable_init``: how the trained parts (fusion, quantizer with its RVQ codebooks, flow decoder) start:
    ``"random"``, the modules' own initializers (the reference recipe: trained from scratch), or a model
    directory (a fine-tune; parts no model directory holds, such as the GPT-loss predictor, start from
    their initializers).
    """

    model: str = "almtokenizer2"
    frozen_from: str = "random"
    trainable_init: str = "random"
    seed: int = 2336
    epochs: int = 5
    steps: int | None = None  # total optimizer steps; None = epochs x steps per epoch
    remat: bool = False  # handed to the task (activation checkpointing per block)
    # How the flow loss is normalised: over the global batch (this port's default: the same loss whatever the
    # device count), or per device as the reference's DDP does (Σ w·err² / Σ w on each device's rows, then
    # the mean over devices; equal to the global one when every row has the same weight sum).
    loss_normalization: Literal["global_batch", "per_device"] = "global_batch"
    # Updates skipped in a row (loss or gradient not finite) after which the run stops as diverged.
    max_skipped_in_a_row: int = 5
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def total_steps(self, dataset_size: int) -> int:
        """Optimizer steps of the run: ``steps`` or ``epochs * floor(N / global_batch) / grad_accum``."""
        if self.steps is not None:
            return self.steps
        per_epoch = dataset_size // (self.data.global_batch_size * self.optimizer.grad_accum)
        if per_epoch == 0:
            raise ValueError(
                f"dataset of {dataset_size} clips is smaller than one update "
                f"({self.data.global_batch_size} x {self.optimizer.grad_accum} clips)"
            )
        return self.epochs * per_epoch

    def schedule_steps(self, dataset_size: int) -> int:
        return self.schedule.total_steps or self.total_steps(dataset_size)

    def warmup_steps(self, dataset_size: int) -> int:
        if self.schedule.warmup_steps is not None:
            return self.schedule.warmup_steps
        return int(math.floor(self.schedule.warmup_fraction * self.schedule_steps(dataset_size)))


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A training config from a YAML file or a shipped preset's name (``train_tiny``), then ``key=value``
    ``overrides``; every value is checked against its declared type (:class:`almtok_jax.config.ConfigError`)."""
    p = preset_path(path)
    return override(from_dict(TrainConfig, read_yaml(p), where=str(p)), list(overrides))
