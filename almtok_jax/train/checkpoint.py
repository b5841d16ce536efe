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

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
import yaml
from etils import epath

from almtok_jax import folder_swap
from almtok_jax.config import ModelDirError
from almtok_jax.finite import describe, non_finite
from almtok_jax.mapping import LazyVariable
from almtok_jax.train import integrity
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


ALIGNMENT = 64  # bytes: a host array JAX can adopt without a copy (jax.dlpack.from_dlpack on the CPU)
CHUNK_BYTES = 64 << 20  # a model directory's arrays are stored in chunks of at most this size


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an :data:`ALIGNMENT`-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


class _OneAtATimeHandler(ocp.type_handlers.NumpyHandler):
    """Host arrays of a model directory, one at a time, so that memory holds the model plus one variable:

    * writing: a :class:`~almtok_jax.mapping.LazyVariable` is read just before it is written and dropped
      once it is on disk, and arrays are not copied first (the default handler deep-copies every array
      before writing: twice the model in memory);
    * reading: each array is read alone into an :data:`ALIGNMENT`-aligned buffer, which JAX adopts without
      a copy (the default reads every array at once, into buffers JAX has to copy).

    The files are those of ``np.ndarray`` leaves, so either side works with the default handler."""

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)
        self._turn: asyncio.Lock | None = None  # made inside the event loop that writes

    async def _open_and_write(self, value: Any, tspec: dict[str, Any], ts_context: Any) -> None:
        self._turn = self._turn or asyncio.Lock()
        async with self._turn:
            array = value.read() if isinstance(value, LazyVariable) else value
            found = non_finite(array)
            if found is not None:  # a model that computes NaN is never written
                name = str(tspec.get("kvstore", {}).get("path", "")).rstrip("/").rsplit("/", 1)[-1]
                raise ValueError(f"weight params/{name}: {describe(found, array.size)}; refusing to write it")
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            await store.write(array, can_reference_source_data_indefinitely=True).commit

    async def deserialize(self, infos: Any, args: Any = None) -> list[np.ndarray]:
        args = args or [ocp.RestoreArgs()] * len(infos)
        out = []
        for info, arg in zip(infos, args, strict=True):
            (array,) = await super().deserialize([info], [arg])
            out.append(aligned_empty(array.shape, array.dtype))
            out[-1][...] = array
            del array
        return out


def _host_handler() -> ocp.PyTreeCheckpointHandler:
    """A PyTree handler whose host arrays (and lazy variables) go through :class:`_OneAtATimeHandler`."""
    handler = _OneAtATimeHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler), (LazyVariable, handler),
        (jax.Array, ocp.type_handlers.ArrayHandler()))  # not used; orbax warns when it is missing
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False, use_ocdbt=False)


# orbax log records a host write drops: an exception raised in a writer thread is logged, traceback and all,
# on each thread it passes through before ``save`` re-raises it (the caller reports it, once); and a save
# outside OCDBT (what the host writer asks for) is reported as a skipped OCDBT merge.
_ORBAX_NOISE = ("_SignalingThread.run() raised an exception", "Skipping merge of OCDBT checkpoints")


@contextlib.contextmanager
def _orbax_noise_dropped():
    """:data:`_ORBAX_NOISE` log records are dropped while the block runs."""

    def keep(record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in _ORBAX_NOISE)

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _write_params(path: epath.Path, variables: dict) -> None:
    """One orbax PyTree checkpoint of ``variables``. Host trees (NumPy arrays, lazy variables: a converted
    release) are written one variable at a time, as one zarr3 array each in chunks of at most
    :data:`CHUNK_BYTES` (read back chunk by chunk), uncompressed (compression buffers are kept until the
    end: ~4 variables more in memory for a few per cent of disk) and outside an OCDBT database (0.9 GiB
    more at the peak of a full-size conversion); see ``benchmarks/bench_convert.py``.
    Device arrays (a training export, maybe spread over processes) go through orbax's own handlers."""
    if all(isinstance(x, np.ndarray | LazyVariable) for x in jax.tree.leaves(variables)):
        chunks = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), variables)
        with _orbax_noise_dropped():
            ocp.Checkpointer(_host_handler()).save(path, args=ocp.args.PyTreeSave(variables, save_args=chunks))
    else:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, variables)
        ckptr.wait_until_finished()


def _discard(folder: epath.Path, attempts: int = 40) -> None:
    """Remove a half-written folder after a failed save; never raises (the save's own error is the one to
    report). orbax's writer threads can still be finishing when ``save`` raises (writing a data file,
    renaming a lock), so the removal is retried until the folder stays gone."""
    for _ in range(attempts):
        try:
            if folder.exists():
                folder.rmtree()
            time.sleep(0.05)
            if not folder.exists():
                return
        except OSError:
            time.sleep(0.05)
    log.warning("could not remove the half-written %s; delete it by hand", folder)


def _shared_token() -> str:
    """A fresh :func:`~almtok_jax.folder_swap.new_token`, the same on every process (the temporary folder
    of a multi-host write is one folder)."""
    token = folder_swap.new_token()
    if jax.process_count() == 1:
        return token
    from jax.experimental import multihost_utils

    words = np.frombuffer(bytes.fromhex(token), np.uint32)
    return np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32).tobytes().hex()


def save_model_dir(directory: str | os.PathLike, variables: dict, config_yaml_text: str,
                   force: bool = False) -> epath.Path:
    """Write ``variables`` (nested dict, e.g. ``{"frozen": ..., "trainable": ...}``; leaves are device
    arrays, NumPy arrays or :class:`~almtok_jax.mapping.LazyVariable`, read as they are written) and the
    config YAML.

    Written to a temporary folder of our own (removed again if writing fails), then swapped in: an existing
    ``DIR`` (``force=True``, model directories only) is first renamed aside, the new one renamed to
    ``DIR``, then the old one deleted (names: :mod:`almtok_jax.folder_swap`; nothing else is touched).
    Writers into one folder take turns, each checking ``DIR`` afresh, so a save that returns has left a
    complete model of its own. A kill at any moment leaves a complete old or new model (at ``DIR``, or only
    aside between the two renames, which the next save puts back first). Every process calls it (orbax
    coordinates multi-host writes); process 0 locks and renames.
    """
    directory = location(directory)
    token = _shared_token()
    tmp, aside = folder_swap.temporary_path(directory, token), folder_swap.aside_path(directory, token)
    primary = jax.process_index() == 0
    yaml.safe_load(config_yaml_text)  # refuse to write a config that cannot be read back
    with folder_swap.parent_lock(directory) if primary else contextlib.nullcontext():
        if primary:
            folder_swap.recover(directory, is_model_dir)
        check_replaceable(directory, force)
        if primary:
            tmp.mkdir(parents=True)
            (tmp / folder_swap.MARKER).write_text("a model directory being written by almtok-jax\n")
        try:
            _write_params(tmp / "params", variables)
        except BaseException:
            _quiet_closed_loop_reports()
            if primary:
                _discard(tmp)
            raise
        if primary:
            (tmp / "config.yaml").write_text(config_yaml_text)
            replacing = directory.exists()
            if replacing:
                directory.rename(aside)
            tmp.rename(directory)
            (directory / folder_swap.MARKER).unlink()
            if replacing:
                aside.rmtree()
    return directory


def _restore_numpy(path: epath.Path) -> dict:
    """An orbax PyTree checkpoint as host NumPy arrays, whatever device topology wrote it (a training
    export from 8 devices restores on one), read one array at a time into aligned buffers
    (:class:`_OneAtATimeHandler`)."""
    checkpointer = ocp.Checkpointer(_host_handler())
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
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        found = non_finite(leaf)
        if found is not None:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ModelDirError(f"{directory}: variable {name}: {describe(found, leaf.size)}; "
                                "convert or export the model again")
    return variables, config


def export_params(directory: str | os.PathLike, state_trainable: Any, frozen: Any, config_yaml_text: str,
                  extra: Any = None, force: bool = False) -> epath.Path:
    """Export trained weights as a model directory (:func:`save_model_dir`)."""
    variables = {"frozen": frozen, "trainable": state_trainable}
    if extra is not None:
        variables["extra"] = extra
    return save_model_dir(directory, variables, config_yaml_text, force=force)
