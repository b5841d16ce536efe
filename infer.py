"""Reconstruct or tokenize audio files with a converted or trained model directory.

    python infer.py --checkpoint checkpoints/almtokenizer2 INPUT... -o out [...]

The command lives in :mod:`almtok_jax.cli.infer` (installed as ``almtok-infer``); ``--help`` lists its options.
"""

import sys

from almtok_jax.cli.infer import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
