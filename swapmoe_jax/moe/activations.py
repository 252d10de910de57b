"""Expert and FFN activations, by their Hugging Face names (`ACT2FN`)."""

from __future__ import annotations

import jax


def activation(name: str):
  """The FFN activation named in HF's ACT2FN."""
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name in ("silu", "swish"):
    return jax.nn.silu
  raise ValueError(f"unsupported activation {name!r}")
