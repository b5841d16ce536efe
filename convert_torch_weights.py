"""Convert a released ALMTokenizer2 (PyTorch) into an almtok-jax model directory.

    python convert_torch_weights.py --release DIR_OR_REPO_ID --out checkpoints/almtokenizer2 [...]

The command lives in :mod:`almtok_jax.cli.convert` (installed as ``almtok-convert``); ``--help`` lists its options.
"""

import sys

from almtok_jax.cli.convert import fetch_release, main

__all__ = ["fetch_release", "main"]

if __name__ == "__main__":
    sys.exit(main())
