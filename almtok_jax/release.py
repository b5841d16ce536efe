"""Reading a release folder laid out like ``Dongchao/almtokenizer2`` and checking it against a config.

The folder holds ``ep*.checkpoint`` (``model``: the full state dict), ``sqcodec.pth`` (``codec_model``),
``sq_config.yaml``, ``config.yaml`` (the training arguments, naming the other files) and
``whisper-medium/`` (``config.json``). Paths named in ``config.yaml`` are resolved relative to the folder,
falling back to their base name inside it (the real file holds paths relative to the code repository).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from almtok_jax.config import ALMTokenizer2Config
from almtok_jax.sqcodec import SQCodecConfig
from almtok_jax.torch_io import LazyTensor, open_state_dict


class ReleaseError(ValueError):
    """A release folder is incomplete or disagrees with the config."""


@dataclass
class Release:
    """The parsed release: both state dicts (names, shapes and dtypes read; values read on use) and where
    they came from."""

    folder: Path
    checkpoint: Path
    model_state: dict[str, LazyTensor]
    codec_state: dict[str, LazyTensor]


def _resolve(folder: Path, name: str | None, default: str) -> Path:
    """A file named in ``config.yaml``: as given relative to the folder, else its base name in the folder."""
    for candidate in ([folder / name, folder / Path(name).name] if name else []) + [folder / default]:
        if candidate.exists():
            return candidate
    raise ReleaseError(f"{folder}: missing {name or default!r} (looked for {folder / Path(name or default).name})")


def newest_checkpoint(folder: Path) -> Path:
    """``ep<N>.checkpoint`` with the largest N."""
    found = sorted(folder.glob("ep*.checkpoint"), key=lambda p: int(re.sub(r"\D", "", p.stem) or -1))
    if not found:
        raise ReleaseError(f"{folder}: no ep*.checkpoint file")
    return found[-1]


def _compare(where: str, pairs: dict[str, tuple[object, object]]) -> list[str]:
    return [f"{where}: {name} is {found} in the release but {want} in the config"
            for name, (found, want) in pairs.items() if found != want]


def check_release_configs(folder: Path, train_args: dict, config: ALMTokenizer2Config) -> None:
    """The release's own architecture files must agree with ``config``; every disagreement is listed."""
    problems = []
    sq_path = _resolve(folder, train_args.get("sq_config"), "sq_config.yaml")
    sq = SQCodecConfig.from_yaml(sq_path)
    problems += [f"{sq_path.name}: {f.name} is {getattr(sq, f.name)} but {getattr(config.sqcodec, f.name)} in "
                 "the config" for f in dataclasses.fields(sq)
                 if getattr(sq, f.name) != getattr(config.sqcodec, f.name)]
    whisper_json = _resolve(folder, train_args.get("whisper_path"), "whisper-medium") / "config.json"
    if whisper_json.is_file():
        hf = json.loads(whisper_json.read_text())
        w = config.experts.whisper
        problems += _compare(whisper_json.name, {
            "d_model": (hf.get("d_model"), w.d_model), "encoder_layers": (hf.get("encoder_layers"), w.encoder_layers),
            "encoder_attention_heads": (hf.get("encoder_attention_heads"), w.encoder_attention_heads),
            "encoder_ffn_dim": (hf.get("encoder_ffn_dim"), w.encoder_ffn_dim),
            "num_mel_bins": (hf.get("num_mel_bins"), w.num_mel_bins)})
    dit_name = train_args.get("transformer_diffusion_config")
    dit_json = next((p for p in ([folder / dit_name, folder / Path(dit_name).name] if dit_name else [])
                     if p.is_file()), None)
    if dit_json is not None:  # the real release does not ship it (it is a file of the code repository)
        d, c = json.loads(dit_json.read_text()), config.dit
        problems += _compare(dit_json.name, {
            "num_layers": (d.get("num_layers"), c.num_layers),
            "num_attention_heads": (d.get("num_attention_heads"), c.num_attention_heads),
            "attention_head_dim": (d.get("attention_head_dim"), c.attention_head_dim),
            "in_channels": (d.get("in_channels"), c.in_channels),
            "out_channels": (d.get("out_channels"), c.out_channels),
            "num_positional_embeddings": (d.get("num_positional_embeddings", 3000), c.num_positional_embeddings)})
    if problems:
        raise ReleaseError(f"{folder} does not match the config:\n  " + "\n  ".join(problems))


def read_release(folder: str | Path, config: ALMTokenizer2Config) -> Release:
    """Read and cross-check a release folder; raises :class:`ReleaseError` naming the missing/bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseError(f"release folder {folder} does not exist")
    train_yaml = folder / "config.yaml"
    train_args = yaml.safe_load(train_yaml.read_text()) if train_yaml.is_file() else {}
    if not isinstance(train_args, dict):
        raise ReleaseError(f"{train_yaml}: not a mapping of training arguments")
    check_release_configs(folder, train_args, config)
    checkpoint = newest_checkpoint(folder)
    codec = _resolve(folder, train_args.get("sq_resume"), "sqcodec.pth")
    return Release(folder, checkpoint, open_state_dict(checkpoint, select="model"),
                   open_state_dict(codec, select="codec_model"))
