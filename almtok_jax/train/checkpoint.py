"""Checkpoints (orbax) and model directories.

Training checkpoints (:class:`Checkpointer`): ``WORKDIR/checkpoints/<step>/`` holds the whole
:class:`~almtok_jax.train.state.TrainState` (trainable params, optimizer state, extra state, step, RNG,
skip count); the data stream needs no state of its own (its position is the step, which lets any process
count resume). Saves are async;
restores take target shardings, so a checkpoint written on one mesh restores onto another.

Model directories (:func:`save_model_dir` / :func:`load_model_dir`), shared with the weight converter::

    DIR/params/       orbax PyTree checkpoint of {"frozen": ..., "trainable": ..., ["extra": ...]}
    DIR/config.yaml   the resolved model config

Every location (work directory, checkpoint folder, model directory) is a local path or a URI
(``gs://bucket/...``, any scheme ``etils.epath`` knows) and goes through :func:`location`: ``epath`` is
the path library orbax itself uses, so a bucket works the same as a folder. On an object store the final
rename of :func:`save_model_dir` is a copy and a delete, not atomic.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath

from almtok_jax.config import ModelDirError
from almtok_jax.train.config import CheckpointConfig

log = logging.getLogger("almtok_jax.train")



def _quiet_closed_loop_reports() -> None:
    """After a failed orbax read, the reads still in flight finish on a closed event loop and each reports
    ``RuntimeError: Event loop is closed`` as an unraisable exception (dozens of tracebacks after the real
    error). Drop exactly those; every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop", False):
        return

    def hook(report: object) -> None:
        error = getattr(report, "exc_value", None)
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(report)

    hook.quiet_closed_loop = True
    sys.unraisablehook = hook


def location(path: str | os.PathLike) -> epath.Path:
    """A user-given location as an ``epath.Path``: URIs as given, local paths made absolute (orbax)."""
    path = epath.Path(path)
    return path if "://" in str(path) else path.resolve()


class Checkpointer:
    """``CheckpointManager`` over ``directory`` of the train state (the data position is the step, so the
    data stream needs no state of its own)."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(location(directory), options=options,
                                             item_names=("state",))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

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
                _quiet_closed_loop_reports()
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
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` per leaf carrying the target sharding (restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def is_model_dir(directory: epath.Path) -> bool:
    return (directory / "params").is_dir() and (directory / "config.yaml").is_file()


def check_replaceable(directory: str | os.PathLike, force: bool) -> None:
    """Refuse to write a model directory over anything but an empty folder, or (``force``) a model directory."""
    directory = location(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{directory} exists and is not empty (pass --force to replace it)")
    if not is_model_dir(directory):
        raise FileExistsError(f"{directory} is not a model directory (no params/ and config.yaml); --force "
                              "replaces only model directories: remove it yourself or choose another output")


def save_model_dir(directory: str | os.PathLike, variables: dict, config_yaml_text: str,
                   force: bool = False) -> epath.Path:
    """Write ``variables`` (nested dict, e.g. ``{"frozen": ..., "trainable": ...}``) and the config YAML.

    Written to ``DIR.tmp``, then swapped in: an existing ``DIR`` (``force=True``, model directories only) is
    first renamed to ``DIR.replaced``, the new one renamed to ``DIR``, then the old one deleted. A kill at any
    moment leaves a complete old or new model (at ``DIR``, or only at ``DIR.replaced`` between the two
    renames, which the next save puts back first). Every process calls it (orbax coordinates multi-host
    writes); process 0 renames.
    """
    directory = location(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    aside = directory.with_name(directory.name + ".replaced")
    primary = jax.process_index() == 0
    if primary and aside.is_dir():  # a swap was interrupted
        if is_model_dir(directory):
            aside.rmtree()  # after the second rename: the new model is in place
        elif not directory.exists() and is_model_dir(aside):
            aside.rename(directory)  # between the renames: put the old model back
    check_replaceable(directory, force)
    yaml.safe_load(config_yaml_text)  # refuse to write a config that cannot be read back
    if primary and tmp.exists():
        tmp.rmtree()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", variables)
    ckptr.wait_until_finished()
    if primary:
        (tmp / "config.yaml").write_text(config_yaml_text)
        replacing = directory.exists()
        if replacing:
            directory.rename(aside)
        tmp.rename(directory)
        if replacing:
            aside.rmtree()
    return directory


def _restore_numpy(path: epath.Path) -> dict:
    """An orbax PyTree checkpoint as host NumPy arrays, whatever device topology wrote it (a training
    export from 8 devices restores on one)."""
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_model_dir(directory: str | os.PathLike) -> tuple[dict, dict]:
    """``(variables as nested dict of NumPy arrays, config dict)`` from a :func:`save_model_dir` folder.

    Raises :class:`ModelDirError` naming the directory and what is wrong with it."""
    directory = location(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory}: no such folder")
    missing = [name for name, ok in (("params/", (directory / "params").is_dir()),
                                     ("config.yaml", (directory / "config.yaml").is_file())) if not ok]
    if missing:
        raise ModelDirError(f"{directory} is not a model directory: {' and '.join(missing)} missing "
                            "(write one with convert_torch_weights.py or train.py --export)")
    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ModelDirError(f"{directory / 'config.yaml'} is not readable YAML{at}: "
                            f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{directory / 'config.yaml'} does not hold a config mapping "
                            f"(got {type(config).__name__})")
    try:
        variables = _restore_numpy(directory / "params")
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged checkpoint
        _quiet_closed_loop_reports()
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ModelDirError(f"{directory}: the weights in params/ cannot be read, a file is missing or damaged "
                            f"({reason}); convert or export the model again") from None
    return variables, config


def export_params(directory: str | os.PathLike, state_trainable: Any, frozen: Any, config_yaml_text: str,
                  extra: Any = None, force: bool = False) -> epath.Path:
    """Export trained weights as a model directory (:func:`save_model_dir`)."""
    variables = {"frozen": frozen, "trainable": state_trainable}
    if extra is not None:
        variables["extra"] = extra
    return save_model_dir(directory, variables, config_yaml_text, force=force)
