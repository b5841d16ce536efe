"""Checkpoints (orbax) and model directories.

Training checkpoints (:class:`Checkpointer`): ``WORKDIR/checkpoints/<step>/`` holds the whole
:class:`~almtok_jax.train.state.TrainState` (trainable params, optimizer state, extra state, step, RNG,
skip count) and each host's data-iterator state (grain, ``process_<i>-of-<n>.json``). Saves are async;
restores take target shardings, so a checkpoint written on one mesh restores onto another.

Model directories (:func:`save_model_dir` / :func:`load_model_dir`), shared with the weight converter::

    DIR/params/       orbax PyTree checkpoint of {"frozen": ..., "trainable": ..., ["extra": ...]}
                      (in DIR/params/state/ when written in pieces by the weight converter)
    DIR/config.yaml   the resolved model config
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import traverse_util
from orbax.checkpoint.experimental.v1 import partial

from almtok_jax.train.config import CheckpointConfig


class _IteratorSnapshot:
    """The data iterator's state taken at save time (the async save must not read a moving iterator)."""

    def __init__(self, state: bytes):
        self.state = state

    def get_state(self) -> bytes:
        return self.state


class Checkpointer:
    """``CheckpointManager`` over ``directory`` with items ``state`` (pytree) and ``data`` (iterator)."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
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


def save_model_dir(directory: str | Path, variables: dict, config_yaml_text: str,
                   force: bool = False) -> Path:
    """Write ``variables`` (nested dict, e.g. ``{"frozen": ..., "trainable": ...}``) and the config YAML.

    Atomic: written to ``DIR.tmp`` then renamed. A non-empty ``DIR`` is refused unless ``force=True``
    (then replaced). Every process calls it (orbax coordinates multi-host writes); process 0 renames.
    """
    directory, tmp = _model_dir_tmp(directory, config_yaml_text, force)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", variables)
    ckptr.wait_until_finished()
    return _commit_model_dir(tmp, directory, config_yaml_text)


def save_model_dir_pieces(directory: str | Path, pieces: Iterable[tuple[tuple[str, ...], dict]],
                          config_yaml_text: str, force: bool = False) -> Path:
    """:func:`save_model_dir` for variables that arrive in pieces (host NumPy arrays, one process):
    ``(path, subtree)`` pairs such as ``(("frozen", "whisper"), whisper_variables)``, each written as it
    comes (orbax partial saves of at most about :data:`SAVE_GROUP_BYTES` each) so that the caller can free
    it before making the next. Atomic as a whole: if the iterable raises, the temporary folder is removed
    and nothing else is touched."""
    directory, tmp = _model_dir_tmp(directory, config_yaml_text, force)
    tmp.mkdir(parents=True)
    try:
        for path, subtree in pieces:
            for group in _leaf_groups(subtree, SAVE_GROUP_BYTES):
                partial.save(tmp / "params", _nest(path, group))
            del subtree
        partial.finalize(tmp / "params")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit_model_dir(tmp, directory, config_yaml_text)


SAVE_GROUP_BYTES = 64 * 2**20
"""Bytes of arrays per orbax partial save: orbax copies what one save is given, so this bounds the copy."""


def _leaf_groups(tree: dict, limit: int) -> Iterator[dict]:
    """``tree`` as sub-trees of the same nesting whose arrays add up to at most ``limit`` bytes (or one
    larger array)."""
    group, size = {}, 0
    for key, leaf in traverse_util.flatten_dict(tree).items():
        nbytes = leaf.nbytes
        if group and size + nbytes > limit:
            yield traverse_util.unflatten_dict(group)
            group, size = {}, 0
        group[key], size = leaf, size + nbytes
    if group:
        yield traverse_util.unflatten_dict(group)


def _nest(path: tuple[str, ...], tree: dict) -> dict:
    for name in reversed(path):
        tree = {name: tree}
    return tree


def _model_dir_tmp(directory: str | Path, config_yaml_text: str, force: bool) -> tuple[Path, Path]:
    """Checks before writing a model directory; ``(DIR, DIR.tmp)``, the latter cleared."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} exists and is not empty (pass force=True to replace it)")
    yaml.safe_load(config_yaml_text)  # refuse to write a config that cannot be read back
    tmp = directory.with_name(directory.name + ".tmp")
    if jax.process_index() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    return directory, tmp


def _commit_model_dir(tmp: Path, directory: Path, config_yaml_text: str) -> Path:
    if jax.process_index() == 0:
        (tmp / "config.yaml").write_text(config_yaml_text)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    return directory


def _restore_numpy(path: Path) -> dict:
    """An orbax PyTree checkpoint as host NumPy arrays, whatever device topology wrote it (a training
    export from 8 devices restores on one)."""
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_model_dir(directory: str | Path) -> tuple[dict, dict]:
    """``(variables as nested dict of NumPy arrays, config dict)`` from a :func:`save_model_dir` or
    :func:`save_model_dir_pieces` folder (peak memory about 1.1x the variables)."""
    directory = Path(directory).absolute()
    if not (directory / "params").is_dir() or not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (needs params/ and config.yaml)")
    params = directory / "params"
    # save_model_dir_pieces (orbax partial saves) puts the tree one level down, in params/state
    variables = _restore_numpy(params / "state" if (params / "state").is_dir() else params)
    config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    return variables, config


def export_params(directory: str | Path, state_trainable: Any, frozen: Any, config_yaml_text: str,
                  extra: Any = None, force: bool = False) -> Path:
    """Export trained weights as a model directory (:func:`save_model_dir`)."""
    variables = {"frozen": frozen, "trainable": state_trainable}
    if extra is not None:
        variables["extra"] = extra
    return save_model_dir(directory, variables, config_yaml_text, force=force)


def to_device(tree: dict) -> dict:
    """A nested dict of host arrays moved to the default device in place, one leaf at a time (each host
    copy is dropped as soon as its device copy exists, so the peak stays near one copy of the tree)."""
    for key, value in tree.items():
        tree[key] = to_device(value) if isinstance(value, dict) else jax.numpy.asarray(value)
    return tree
