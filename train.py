"""Train ALMTokenizer2 with sharded, jit-compiled steps, on one host or many.

    python train.py --config configs/train_tiny.yaml --workdir runs/tiny [--steps N] [--resume] [...]

The command lives in :mod:`almtok_jax.train.run` (installed as ``almtok-train``); ``--help`` lists its options.
"""

import sys

from almtok_jax.train.run import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
