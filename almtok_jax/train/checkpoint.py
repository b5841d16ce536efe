"""Checkpoints (orbax) and model directories.

Training checkpoints (:class:`Checkpointer`): ``WORKDIR/checkpoints/<step>/`` holds the whole
:class:`~almtok_jax.train.state.TrainState` (trainable params, optimizer state, extra state, step, RNG,
skip count) and, when given, each host's data-iterator state (grain, ``process_<i>-of-<n>.json``;
``train.py`` gives none: its data position is the step, which lets any process count resume). Saves are async;
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

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath

from almtok_jax.train.config import CheckpointConfig


def location(path: str | os.PathLike) -> epath.Path:
    """A user-given location as an ``epath.Path``: URIs as given, local paths made absolute (orbax)."""
    path = epath.Path(path)
    return path if "://" in str(path) else path.resolve()


class _IteratorSnapshot:
    """The data iterator's state taken at save time (the async save must not read a moving iterator)."""

    def __init__(self, state: bytes):
        self.state = state

    def get_state(self) -> bytes:
        return self.state


class Checkpointer:
    """``CheckpointManager`` over ``directory`` with items ``state`` (pytree) and ``data`` (iterator)."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(location(directory), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any | None, step: int | None = None) -> Any:
        """Restore ``step`` (default latest) onto the shardings of ``abstract_state`` (``ShapeDtypeStruct``s
        with ``.sharding``); the data iterator is restored in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` per leaf carrying the target sharding (restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_model_dir(directory: str | os.PathLike, variables: dict, config_yaml_text: str,
                   force: bool = False) -> epath.Path:
    """Write ``variables`` (nested dict, e.g. ``{"frozen": ..., "trainable": ...}``) and the config YAML.

    Atomic: written to ``DIR.tmp`` then renamed. A non-empty ``DIR`` is refused unless ``force=True``
    (then replaced). Every process calls it (orbax coordinates multi-host writes); process 0 renames.
    """
    directory = location(directory)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} exists and is not empty (pass force=True to replace it)")
    yaml.safe_load(config_yaml_text)  # refuse to write a config that cannot be read back
    tmp = directory.with_name(directory.name + ".tmp")
    primary = jax.process_index() == 0
    if primary and tmp.exists():
        tmp.rmtree()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", variables)
    ckptr.wait_until_finished()
    if primary:
        (tmp / "config.yaml").write_text(config_yaml_text)
        if directory.exists():
            directory.rmtree()
        tmp.rename(directory)
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
    """``(variables as nested dict of NumPy arrays, config dict)`` from a :func:`save_model_dir` folder."""
    directory = location(directory)
    if not (directory / "params").is_dir() or not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (needs params/ and config.yaml)")
    variables = _restore_numpy(directory / "params")
    config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    return variables, config


def export_params(directory: str | os.PathLike, state_trainable: Any, frozen: Any, config_yaml_text: str,
                  extra: Any = None, force: bool = False) -> epath.Path:
    """Export trained weights as a model directory (:func:`save_model_dir`)."""
    variables = {"frozen": frozen, "trainable": state_trainable}
    if extra is not None:
        variables["extra"] = extra
    return save_model_dir(directory, variables, config_yaml_text, force=force)
