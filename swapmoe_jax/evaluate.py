"""`python -m swapmoe_jax.evaluate`: the entry point of `swapmoe_jax.eval.evaluate` (the code lives there)."""

import sys

from swapmoe_jax.eval.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
