import sys

from almtok_jax.golden.runner import main

sys.exit(main())
