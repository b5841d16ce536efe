"""Training logs: console lines, ``metrics.jsonl``, TensorBoard scalars, audio samples.

Only process 0 writes. Every logged step appends one JSON object to ``WORKDIR/metrics.jsonl`` with at
least ``step, loss, grad_norm, lr, skipped`` and the task's loss terms (``loss_*``: for ALMTokenizer2
``loss_flow, loss_commit, loss_phone``); validation lines carry a ``split`` field.
TensorBoard scalars go to ``WORKDIR/tensorboard`` when ``tensorboardX`` is installed.
``WORKDIR`` may be a URI (``etils.epath``); TensorBoard files then go through tensorboardX's own storage
layer (which reads ``gs://`` / ``s3://`` with its optional dependencies).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import soundfile as sf
from etils import epath

log = logging.getLogger("almtok_jax.train")


class TrainLogger:
    """``log_train`` every ``LoggingConfig.every`` steps, ``log_eval`` after validation passes."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, audio_seconds_per_step: float = 0.0,
                 resume_step: int | None = None):
        """``resume_step``: the step a resumed run restarts from; later lines of ``metrics.jsonl`` (from the
        steps the run will do again) are dropped first."""
        self.workdir = epath.Path(workdir)
        self.primary = jax.process_index() == 0
        self.audio_seconds_per_step = audio_seconds_per_step
        self.writer = None
        self._last: tuple[int, float] | None = None
        if self.primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                _truncate_jsonl(self.workdir / "metrics.jsonl", resume_step)
            self.jsonl = (self.workdir / "metrics.jsonl").open("a")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self.writer = SummaryWriter(str(self.workdir / "tensorboard"))
                except ImportError:
                    log.info("tensorboardX not installed: no TensorBoard scalars (pip install tensorboardX)")

    def start(self, step: int) -> None:
        """Reset the throughput clock (call after compilation / restore)."""
        self._last = (step, time.perf_counter())

    def _rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        rates = {}
        if self._last is not None and step > self._last[0]:
            steps_per_s = (step - self._last[0]) / max(now - self._last[1], 1e-9)
            rates = {"steps_per_s": steps_per_s,
                     "audio_hours_per_s": steps_per_s * self.audio_seconds_per_step / 3600.0}
        self._last = (step, now)
        return rates

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """``metrics``: host scalars of the update that brought the state to ``step``."""
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}, **self._rates(step)}
        if not self.primary:
            return
        self._write(record, "train")
        terms = "".join(f"  {k.removeprefix('loss_')} {record[k]:.4f}" for k in record if k.startswith("loss_"))
        log.info("step %d  loss %.4f%s  gnorm %.3f  lr %.3g  skipped %d%s",
                 step, record["loss"], terms, record["grad_norm"], record["lr"], record["skipped"],
                 f"  {record['steps_per_s']:.2f} steps/s  {record['audio_hours_per_s']:.4f} audio-h/s"
                 if "steps_per_s" in record else "")

    def log_eval(self, step: int, name: str, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "split": f"val/{name}", **{k: _scalar(v) for k, v in metrics.items()}}
        if self.primary:
            self._write(record, f"val/{name}")
            log.info("step %d  validation %s  loss %.4f", step, name, record["loss"])

    def write_samples(self, step: int, wavs: np.ndarray, references: np.ndarray, sample_rate: int) -> None:
        """Reconstructions (and their inputs) as ``WORKDIR/samples/<step>/<i>_{rec,ref}.wav``."""
        if not self.primary:
            return
        folder = self.workdir / "samples" / f"{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(zip(wavs, references, strict=True)):
            for kind, wav in zip(("rec", "ref"), pair, strict=True):
                with (folder / f"{i}_{kind}.wav").open("wb") as f:
                    sf.write(f, np.clip(wav, -1, 1), sample_rate, format="WAV")

    def _write(self, record: dict, prefix: str) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "split"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.primary:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _truncate_jsonl(path: epath.Path, last_step: int) -> None:
    """Keep the records of steps ``<= last_step`` (written to a temporary file, then renamed over); a line
    cut short by a kill is dropped too."""
    if not path.exists():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")

    kept = [line for line in path.read_text().splitlines(keepends=True) if step_of(line) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line.rstrip("\n") + "\n" for line in kept))
    tmp.replace(path)


def _scalar(value: object) -> float | int:
    arr = np.asarray(value)
    return int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)


def setup_console(level: int = logging.INFO) -> None:
    """Console handler on the ``almtok_jax`` loggers (other libraries may have configured the root logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("almtok_jax")
    root.handlers = [handler]
    root.setLevel(level)
    root.propagate = False
