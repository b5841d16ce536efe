"""Model directories: what the weight converter and a training export write, and what the tokenizer reads::

    DIR/params/       orbax PyTree checkpoint of {"frozen": ..., "trainable": ..., ["extra": ...]}
    DIR/config.yaml   the resolved model config

:func:`save_model_dir` / :func:`load_model_dir` write and read them one array at a time;
:func:`load_model` also checks the config against the weights and itself (:func:`check_model`).

Every location (work directory, checkpoint folder, model directory) is a local path or a URI
(``gs://bucket/...``, any scheme ``etils.epath`` knows) and goes through :func:`location`: ``epath`` is
the path library orbax itself uses, so a bucket works the same as a folder. On an object store the final
rename of :func:`save_model_dir` is a copy and a delete, not atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
import yaml
from etils import epath
from flax import traverse_util

from almtok_jax import folder_swap
from almtok_jax.config import ALMTokenizer2Config, ConfigError, model_config_from_dict
from almtok_jax.finite import describe, non_finite
from almtok_jax.mapping import LazyVariable
from almtok_jax.model import FROZEN, abstract_variables

log = logging.getLogger("almtok_jax.weights")


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or unreadable, or its config disagrees with its weights or
    with itself; the message names the directory and what is wrong."""


def quiet_closed_loop_reports() -> None:
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
            quiet_closed_loop_reports()
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
        quiet_closed_loop_reports()
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


def split_variables(variables: Mapping) -> dict[str, dict]:
    """Component variables -> the model-directory layout ``{"frozen": {...}, "trainable": {...}}``."""
    return {"frozen": {k: v for k, v in variables.items() if k in FROZEN},
            "trainable": {k: v for k, v in variables.items() if k not in FROZEN}}


def merge_variables(tree: Mapping) -> dict[str, dict]:
    """A model directory's tree (``frozen``, ``trainable`` and, from training, ``extra``) -> component
    variables; collections of one component spread over several parts are merged."""
    out: dict[str, dict] = {}
    for part in ("frozen", "trainable", "extra"):
        for component, collections in tree.get(part, {}).items():
            out.setdefault(component, {}).update(collections)
    return out


def variable_problems(variables: Mapping, config: ALMTokenizer2Config,
                      names: tuple[str, ...] | None = None) -> list[str]:
    """Every way ``variables`` (component -> collections) differ from what ``config`` builds: a missing or
    unknown component, a missing or unknown variable, a shape (stored, then config) that differs."""
    expected = abstract_variables(config, names)
    selected = {k: v for k, v in variables.items() if names is None or k in names}
    problems = [f"component {n}: not stored, but the config builds it" for n in expected if n not in selected]
    problems += [f"component {n}: stored, but the config does not build it" for n in selected if n not in expected]
    for name in (n for n in expected if n in selected):
        want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected[name]).items()}
        got = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(selected[name])).items()}
        problems += [f"component {name}: {p}: not stored" for p in sorted(set(want) - set(got))]
        problems += [f"component {name}: {p}: stored, but the config has no such variable"
                     for p in sorted(set(got) - set(want))]
        problems += [f"component {name}: {p}: stored shape {got[p]}, the config implies {want[p]}"
                     for p in sorted(set(want) & set(got)) if got[p] != want[p]]
    return problems


def pipeline_problems(config: ALMTokenizer2Config) -> list[str]:
    """Every pipeline number that contradicts what the model is built for (frame rates of the SQ codec and
    the quantizer; window arithmetic of spec 03 §6, B1 and B4; the DiT position table). That every part
    reads the same sample rate is checked by :class:`~almtok_jax.config.ALMTokenizer2Config` itself."""
    p, sq = config.pipeline, config.sqcodec
    problems = []
    latent_rate = sq.sample_rate / sq.hop_length
    if not math.isclose(p.latent_rate, latent_rate):
        problems.append(f"pipeline.latent_rate is {p.latent_rate} but the SQ codec gives {latent_rate} frames/s "
                        f"({sq.sample_rate} Hz / hop {sq.hop_length})")
    token_rate = latent_rate / config.quantizer.interval
    if not math.isclose(p.token_rate, token_rate):
        problems.append(f"pipeline.token_rate is {p.token_rate} but the quantizer gives {token_rate} tokens/s "
                        f"({latent_rate} frames/s / interval {config.quantizer.interval})")
    if problems:
        return problems  # the window numbers below are meaningless with the wrong rates
    window, frames = int(p.min_duration * p.token_rate), int(p.min_duration * p.latent_rate)
    if frames != 2 * window or window < 4:
        return [f"pipeline.min_duration {p.min_duration} s gives {window} tokens and {frames} latent frames per "
                "window; it must give at least 4 tokens and exactly twice as many frames (a multiple of 0.08 s)"]
    overlap = window - (window // 4) * 3
    if p.prompt_frames > 2 * overlap:
        problems.append(f"pipeline.prompt_frames {p.prompt_frames} is longer than the {2 * overlap} latent frames "
                        f"two windows of pipeline.min_duration {p.min_duration} s share (spec 03 §6.3 B1)")
    if frames > config.dit.num_positional_embeddings:
        problems.append(f"pipeline.min_duration {p.min_duration} s gives {frames} latent frames per window, more "
                        f"than dit.num_positional_embeddings {config.dit.num_positional_embeddings}")
    return problems


def _raise(directory: str | Path, what: str, problems: list[str]) -> None:
    if problems:
        raise ModelDirError(f"model directory {directory}: {what}:\n  " + "\n  ".join(problems))


def check_model(variables: Mapping, config: ALMTokenizer2Config, where: str | Path,
                names: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ModelDirError` naming ``where`` unless ``config`` fits ``variables`` (the
    components ``names``, default all) and its pipeline numbers fit the model."""
    _raise(where, "config.yaml does not match the stored weights", variable_problems(variables, config, names))
    _raise(where, "config.yaml pipeline does not match the model", pipeline_problems(config))


def load_model(directory: str | Path) -> tuple[dict, ALMTokenizer2Config]:
    """``(variables as NumPy, config)`` of a model directory (``convert_torch_weights.py`` or a training
    export), its config checked against its weights and itself (:func:`check_model`)."""
    tree, raw = load_model_dir(directory)
    try:
        config = model_config_from_dict(raw, where="config.yaml")
    except ConfigError as e:
        raise ModelDirError(f"model directory {directory}: {e}") from None
    variables = merge_variables(tree)
    check_model(variables, config, directory)
    return variables, config


def to_device(variables: dict) -> dict:
    """Host variables (as :func:`load_model` gives them) moved to the default device, in place, one array
    at a time: each host array is let go as soon as it is moved, and on the CPU an aligned array (a model
    directory is read into aligned buffers) is adopted without a copy, so the model is in memory once. The
    arrays are committed to this process's first device (a multi-device caller places them itself)."""
    device = jax.local_devices()[0]
    for name, value in variables.items():
        if isinstance(value, dict):
            to_device(value)
        elif isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.writeable:
            variables[name] = jax.dlpack.from_dlpack(value, device=device)
        else:
            variables[name] = jax.device_put(value, device)
    return variables
