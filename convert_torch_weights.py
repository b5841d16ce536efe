"""Convert a released ALMTokenizer2 (PyTorch) into an almtok-jax model directory.

    python convert_torch_weights.py --release DIR_OR_REPO_ID --out checkpoints/almtokenizer2 [--config YAML] [--force]

``--release`` is a folder laid out like ``Dongchao/almtokenizer2`` (``ep*.checkpoint``, ``sqcodec.pth``,
``sq_config.yaml``, ``config.yaml``, ``whisper-medium/``), or a model-hub repo id (downloaded first when
``huggingface_hub`` is installed). Every tensor is checked against ``--config`` (default: the released
architecture, ``configs/almtokenizer2.yaml``); missing, unexpected and mis-shaped tensors are listed
together. Nothing from the checkpoint's pickles is executed. The output (an orbax checkpoint with
``frozen`` experts + SQ codec and the ``trainable`` parts, plus the resolved ``config.yaml``) is written
to a temporary folder and renamed, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from almtok_jax.config import CONFIG_DIR, load_model_config, to_dict


def fetch_release(release: str) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded with ``huggingface_hub``."""
    path = Path(release)
    if path.exists():
        return path
    from almtok_jax.release import ReleaseError

    if release.count("/") != 1 or release.startswith((".", "/")):
        raise ReleaseError(f"release folder {release} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ReleaseError(f"{release} is not a folder, and downloading it needs huggingface_hub "
                           "(pip install 'almtok-jax[hub]')") from None
    try:
        return Path(snapshot_download(release))
    except Exception as e:  # network errors come in many types; report them all the same way
        raise ReleaseError(f"could not download {release} from the model hub ({type(e).__name__}: {e}); "
                           "download it by hand and pass the folder") from None


def convert(release: Path, out: Path, config_path: Path, force: bool = False) -> Path:
    """Read, validate and write; returns the output folder."""
    import yaml

    from almtok_jax.model import FROZEN, convert_components
    from almtok_jax.release import read_release
    from almtok_jax.train.checkpoint import save_model_dir_pieces

    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    config = load_model_config(config_path)
    rel = read_release(release, config)
    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False)
    components = convert_components(rel.model_state, rel.codec_state, config, source=str(rel.checkpoint))
    pieces = ((("frozen" if name in FROZEN else "trainable", name), variables) for name, variables in components)
    return save_model_dir_pieces(out, pieces, config_yaml, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="release folder or hub repo id (Dongchao/almtokenizer2)")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "almtokenizer2.yaml",
                        help="architecture preset (default: configs/almtokenizer2.yaml)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    from almtok_jax.mapping import MappingError
    from almtok_jax.release import ReleaseError
    from almtok_jax.torch_io import CheckpointError

    try:
        out = convert(fetch_release(args.release), args.out, args.config, args.force)
    except (MappingError, ReleaseError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
