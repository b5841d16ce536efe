"""Convert a released ALMTokenizer2 (PyTorch) into an almtok-jax model directory.

    python convert_torch_weights.py --release DIR_OR_REPO_ID --out checkpoints/almtokenizer2 \
        [--config YAML] [--checkpoint-file ep5.checkpoint] [--force]

``--release`` is a folder laid out like ``Dongchao/almtokenizer2`` (``ep*.checkpoint``, ``sqcodec.pth``,
``sq_config.yaml``, ``config.yaml``, ``whisper-medium/config.json``), or a model-hub repo id (only the files
read here are downloaded, when ``huggingface_hub`` is installed; the hub cache serves a second run). The
architecture comes from the release: ``sq_config.yaml``, ``model_config.json``, ``whisper-medium/config.json``
and the key names and shapes of the checkpoint (newest epoch/iteration unless ``--checkpoint-file`` names
one); ``--config`` overrides it with a preset, which the release files are then checked against. Every
tensor is checked against the architecture; missing, unexpected and mis-shaped tensors are listed
together. Nothing from the checkpoint's pickles is executed. The output (an orbax checkpoint with
``frozen`` experts + SQ codec and the ``trainable`` parts, plus the resolved ``config.yaml``) is written
to a temporary folder and renamed, so a failed run leaves nothing behind. ``--force`` replaces an existing
model directory (and nothing else) by renaming it aside, renaming the new one in, then deleting the old.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from almtok_jax.weights.hub import convert_release, fetch_release

__all__ = ["fetch_release", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="release folder or hub repo id (Dongchao/almtokenizer2)")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--config", type=Path, default=None,
                        help="architecture preset overriding the release's own (checked against its files)")
    parser.add_argument("--checkpoint-file", default=None,
                        help="checkpoint to convert (default: the newest ep<N>[-iter<M>].checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    args = parser.parse_args(argv)
    from almtok_jax.mapping import MappingError
    from almtok_jax.weights.release import ReleaseError
    from almtok_jax.weights.torch_io import CheckpointError

    try:
        release = fetch_release(args.release, args.checkpoint_file)
        out = convert_release(release, args.out, args.config, args.force, args.checkpoint_file)
    except (MappingError, ReleaseError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
