"""Training checkpoints (orbax).

:class:`Checkpointer`: ``WORKDIR/checkpoints/<step>/`` holds the whole
:class:`~almtok_jax.train.state.TrainState` (trainable params, optimizer state, extra state, step, RNG,
skip count); the data stream needs no state of its own (its position is the step, which lets any process
count resume). Saves are async; restores take target shardings, so a checkpoint written on one mesh restores
onto another. The trained weights leave as a model directory (:func:`export_params`,
:mod:`almtok_jax.weights.model_dir`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from almtok_jax.train import integrity
from almtok_jax.train.config import CheckpointConfig
from almtok_jax.weights.model_dir import location, quiet_closed_loop_reports, save_model_dir

log = logging.getLogger("almtok_jax.train")


class Checkpointer:
    """``CheckpointManager`` over ``directory`` of the train state (the data position is the step, so the
    data stream needs no state of its own)."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(location(directory), options=options,
                                             item_names=("state", "checksums"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> bool:
        """Save ``state`` with the word sums of its arrays (:mod:`~almtok_jax.train.integrity`), unless a
        floating value of it is not finite: such a state is never written (nor can it rotate a finite
        checkpoint away). Returns whether it was saved."""
        sums, finite = integrity.inspect(state)
        if not finite:
            log.warning("step %d: the training state holds NaN or infinite values; no checkpoint written", step)
            return False
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        checksums=ocp.args.JsonSave(sums)), force=True)
        return True

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore ``step`` onto the shardings of ``abstract_state`` (``ShapeDtypeStruct``s with
        ``.sharding``).

        Without ``step``: the newest checkpoint that reads back. An unreadable newer one (a file deleted or
        cut short) is moved aside to ``<checkpoints>.unreadable/<step>`` with a warning, so training goes on
        from the newest complete checkpoint and later saves do not meet it again.
        """
        if step is not None:
            return self._restore_step(step, abstract_state)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        for i, candidate in enumerate(steps):
            try:
                return self._restore_step(candidate, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                quiet_closed_loop_reports()
                aside = epath.Path(str(self.manager.directory) + ".unreadable")
                aside.mkdir(exist_ok=True)
                name = next(n for n in (str(candidate), *(f"{candidate}-{k}" for k in range(1, 10**6)))
                            if not (aside / n).exists())
                (epath.Path(self.manager.directory) / str(candidate)).rename(aside / name)
                self.manager.reload()
                following = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
                log.warning("checkpoint %d in %s cannot be read (%s: %s); moved to %s; %s", candidate,
                            self.manager.directory, type(e).__name__, str(e).splitlines()[0][:300], aside,
                            following)
        raise FileNotFoundError(f"no readable checkpoint in {self.manager.directory} (unreadable ones moved "
                                f"to {aside})")

    def _restore_step(self, step: int, abstract_state: Any) -> Any:
        """The state of checkpoint ``step``, its arrays checked against the word sums written with them
        (checkpoints written before the sums existed are read unchecked)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        checked = (epath.Path(self.manager.directory) / str(step) / "checksums").exists()
        if checked:
            items["checksums"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if checked:
            bad = integrity.mismatches(restored["checksums"], integrity.inspect(restored["state"])[0])
            if bad:
                raise ValueError(f"checkpoint {step}: {len(bad)} arrays do not match the checksum written with "
                                 f"them ({', '.join(bad[:3])}): the data changed on disk")
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` per leaf carrying the target sharding (restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_params(directory: str | os.PathLike, state_trainable: Any, frozen: Any, config_yaml_text: str,
                  extra: Any = None, force: bool = False) -> epath.Path:
    """Export trained weights as a model directory (:func:`save_model_dir`)."""
    variables = {"frozen": frozen, "trainable": state_trainable}
    if extra is not None:
        variables["extra"] = extra
    return save_model_dir(directory, variables, config_yaml_text, force=force)
