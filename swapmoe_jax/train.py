"""`python -m swapmoe_jax.train`: the entry point of `swapmoe_jax.builtin.train` (the code lives there)."""

import sys

from swapmoe_jax.builtin.train import main

if __name__ == "__main__":
  sys.exit(main())
