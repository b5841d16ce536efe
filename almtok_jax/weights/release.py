"""Reading a release folder laid out like ``Dongchao/almtokenizer2`` and checking it against a config.

The folder holds ``ep*.checkpoint`` (``model``: the full state dict), ``sqcodec.pth`` (``codec_model``),
``sq_config.yaml``, ``config.yaml`` (the training arguments, naming the other files) and
``whisper-medium/`` (only its ``config.json`` is read). Paths named in ``config.yaml`` are resolved relative
to the folder, falling back to their base name inside it (the real file holds paths relative to the code
repository).

The architecture comes from the release itself (:func:`almtok_jax.weights.convert.derive_config`): the files that
state it (:data:`RELEASE_FILES`) and the key names and shapes of the checkpoint; a config given explicitly
is checked against those files instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from almtok_jax.component import DIT_CONFIG, SQ_CONFIG, WHISPER_CONFIG
from almtok_jax.config import ALMTokenizer2Config, read_yaml
from almtok_jax.sqcodec import SQCodecConfig, sq_config_from_section
from almtok_jax.weights.convert import derive_config
from almtok_jax.weights.torch_io import LazyTensor, open_state_dict


class ReleaseError(ValueError):
    """A release folder is incomplete or disagrees with the config."""


@dataclass
class Release:
    """The parsed release: both state dicts (names, shapes and dtypes read; values read on use), the
    architecture and where they came from."""

    folder: Path
    checkpoint: Path
    model_state: dict[str, LazyTensor]
    codec_state: dict[str, LazyTensor]
    config: ALMTokenizer2Config


def _find(folder: Path, name: str | None, default: str) -> Path | None:
    """A file named in ``config.yaml``: as given relative to the folder, else its base name in the folder,
    else ``default`` in the folder; ``None`` if none exists."""
    candidates = ([folder / name, folder / Path(name).name] if name else []) + [folder / default]
    return next((p for p in candidates if p.exists()), None)


def _resolve(folder: Path, name: str | None, default: str) -> Path:
    """:func:`_find`, required."""
    found = _find(folder, name, default)
    if found is not None:
        return found
    raise ReleaseError(f"{folder}: missing {name or default!r} (looked for {folder / Path(name or default).name})")


def read_sq_section(path: str | Path) -> dict:
    """The ``generator.config`` mapping of a release ``sq_config.yaml`` (the ``ScalarModel`` arguments)."""
    path = Path(path)
    data = read_yaml(path)
    section = (data.get("generator") or {}).get("config") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ReleaseError(f"{path}: no 'generator.config' mapping (the SQ codec hyper-parameters)")
    return section


def read_sq_config(path: str | Path) -> SQCodecConfig:
    """The SQ codec hyper-parameters of a release ``sq_config.yaml``, every one of them required: upstream
    splats them into a constructor without defaults."""
    return sq_config_from_section(read_sq_section(path), f"{path}: generator.config")


RELEASE_FILES = (SQ_CONFIG, DIT_CONFIG, WHISPER_CONFIG)
_CHECKPOINT_NAME = re.compile(r"ep(\d+)(?:-iter(\d+))?")


def checkpoint_order(name: str) -> tuple[int, float] | None:
    """``(epoch, iteration)`` of ``ep<E>[-iter<I>].checkpoint``; an epoch's own file (no ``-iter``) comes
    after its iteration files. ``None`` for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(name.removesuffix(".checkpoint"))
    if match is None:
        return None
    return int(match.group(1)), float(match.group(2)) if match.group(2) else float("inf")


def newest_checkpoint(folder: Path) -> Path:
    """The ``ep<E>[-iter<I>].checkpoint`` of the latest epoch and iteration (``ep4-iter5000`` < ``ep5``)."""
    found = [(order, p) for p in folder.glob("ep*.checkpoint") if (order := checkpoint_order(p.name)) is not None]
    if not found:
        raise ReleaseError(f"{folder}: no ep<N>[-iter<M>].checkpoint file (name one with --checkpoint-file)")
    return max(found)[1]


def select_checkpoint(folder: Path, name: str | Path | None = None) -> Path:
    """``name`` (a path, or a file name inside ``folder``) if given, else :func:`newest_checkpoint`."""
    if name is None:
        return newest_checkpoint(folder)
    for candidate in (Path(name), folder / name):
        if candidate.is_file():
            return candidate
    raise ReleaseError(f"checkpoint file {name} not found (neither as given nor in {folder})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReleaseError(f"{path}: not a JSON object")
    return data


def read_release_files(folder: Path, train_args: dict) -> dict[str, dict]:
    """The parsed release files a component's ``derive`` reads, by name (:data:`RELEASE_FILES`): the
    ``generator.config`` section of ``sq_config.yaml`` (required), ``model_config.json`` and
    ``whisper-medium/config.json`` (each only if present)."""
    files = {SQ_CONFIG: read_sq_section(_resolve(folder, train_args.get("sq_config"), SQ_CONFIG))}
    whisper_dir = _find(folder, train_args.get("whisper_path"), str(Path(WHISPER_CONFIG).parent))
    found = {DIT_CONFIG: _find(folder, train_args.get("transformer_diffusion_config"), DIT_CONFIG),
             WHISPER_CONFIG: whisper_dir / Path(WHISPER_CONFIG).name if whisper_dir is not None else None}
    files.update({name: _read_json(path) for name, path in found.items() if path is not None and path.is_file()})
    return files


# (config.yaml argument naming the file, default name): every file the converter reads besides the checkpoint.
_NAMED_FILES = (("sq_config", SQ_CONFIG), ("sq_resume", "sqcodec.pth"), ("transformer_diffusion_config", DIT_CONFIG),
                ("whisper_path", WHISPER_CONFIG))


def download_release(hub, repo_id: str, checkpoint_file: str | None = None, revision: str | None = None) -> Path:
    """Fetch only the files the converter reads from model-hub repo ``repo_id`` at ``revision`` (default its
    main branch; ``hub``: the ``huggingface_hub`` module; one ``hf_hub_download`` per file, so the hub cache
    serves a second run and the progress bars are the hub's): ``config.yaml``, the files it names,
    ``whisper-medium/config.json`` (not the Whisper weights) and one checkpoint. Returns the local folder
    laid out like the repo."""
    at = {"revision": revision} if revision is not None else {}
    listed = set(hub.list_repo_files(repo_id, **at))
    downloaded = {}

    def get(name: str) -> Path:
        downloaded[name] = Path(hub.hf_hub_download(repo_id, name, **at))
        return downloaded[name]

    train_args = read_yaml(get("config.yaml")) if "config.yaml" in listed else {}
    train_args = train_args if isinstance(train_args, dict) else {}
    wanted = set()
    for arg, default in _NAMED_FILES:
        given = train_args.get(arg)
        if arg == "whisper_path" and given:
            given = str(Path(given) / Path(WHISPER_CONFIG).name)
        wanted |= {default} | ({given, Path(given).name} if given else set())
    checkpoints = [n for n in listed if "/" not in n and checkpoint_order(n) is not None]
    if checkpoint_file is None and not checkpoints:
        raise ReleaseError(f"{repo_id}: no ep<N>[-iter<M>].checkpoint file in the repository")
    for name in sorted(wanted & listed):
        get(name)
    get(checkpoint_file or max(checkpoints, key=checkpoint_order))  # a named one even if not listed
    name, path = next(iter(downloaded.items()))
    return path.parents[len(Path(name).parts) - 1]


def _compare(where: str, pairs: dict[str, tuple[object, object]]) -> list[str]:
    return [f"{where}: {name} is {found} in the release but {want} in the config"
            for name, (found, want) in pairs.items() if found != want]


def check_release_configs(folder: Path, files: dict[str, dict], config: ALMTokenizer2Config) -> None:
    """The release's own architecture files (:func:`read_release_files`) must agree with ``config``; every
    disagreement is listed."""
    sq = sq_config_from_section(files[SQ_CONFIG], f"{SQ_CONFIG}: generator.config")
    problems = [f"{SQ_CONFIG}: {f.name} is {getattr(sq, f.name)} but {getattr(config.sqcodec, f.name)} in the config"
                for f in dataclasses.fields(sq) if getattr(sq, f.name) != getattr(config.sqcodec, f.name)]
    if WHISPER_CONFIG in files:
        hf, w = files[WHISPER_CONFIG], config.experts.whisper
        problems += _compare(WHISPER_CONFIG, {
            "d_model": (hf.get("d_model"), w.d_model), "encoder_layers": (hf.get("encoder_layers"), w.encoder_layers),
            "encoder_attention_heads": (hf.get("encoder_attention_heads"), w.encoder_attention_heads),
            "encoder_ffn_dim": (hf.get("encoder_ffn_dim"), w.encoder_ffn_dim),
            "num_mel_bins": (hf.get("num_mel_bins"), w.num_mel_bins)})
    if DIT_CONFIG in files:  # the real release may not ship it (upstream reads it from the code repository)
        d, c = files[DIT_CONFIG], config.dit
        problems += _compare(DIT_CONFIG, {
            "num_layers": (d.get("num_layers"), c.num_layers),
            "num_attention_heads": (d.get("num_attention_heads"), c.num_attention_heads),
            "attention_head_dim": (d.get("attention_head_dim"), c.attention_head_dim),
            "in_channels": (d.get("in_channels"), c.in_channels),
            "out_channels": (d.get("out_channels"), c.out_channels),
            "num_positional_embeddings": (d.get("num_positional_embeddings", 3000), c.num_positional_embeddings)})
    if problems:
        raise ReleaseError(f"{folder} does not match the config:\n  " + "\n  ".join(problems))


def read_release(folder: str | Path, config: ALMTokenizer2Config | None = None,
                 checkpoint_file: str | Path | None = None) -> Release:
    """Read a release folder and its architecture: ``config`` if given (checked against the release's
    files), else derived from the release (:func:`almtok_jax.weights.convert.derive_config`). ``checkpoint_file``
    names the checkpoint (default: :func:`newest_checkpoint`). Raises :class:`ReleaseError` naming the
    missing or bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseError(f"release folder {folder} does not exist")
    train_yaml = folder / "config.yaml"
    train_args = read_yaml(train_yaml) if train_yaml.is_file() else {}
    if not isinstance(train_args, dict):
        raise ReleaseError(f"{train_yaml}: not a mapping of training arguments")
    files = read_release_files(folder, train_args)
    if config is not None:
        check_release_configs(folder, files, config)
    checkpoint = select_checkpoint(folder, checkpoint_file)
    codec = _resolve(folder, train_args.get("sq_resume"), "sqcodec.pth")
    model_state = open_state_dict(checkpoint, select="model")
    codec_state = open_state_dict(codec, select="codec_model")
    if config is None:
        config = derive_config(model_state, codec_state, files, source=str(checkpoint))
    return Release(folder, checkpoint, model_state, codec_state, config)
