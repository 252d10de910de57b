"""Expert and FFN activations, by their Hugging Face names (`ACT2FN`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def gated(act):
  """The hidden function of a GLU expert: h = wi·x holds the gate rows then the up rows ([..., 2F]);
  returns act(gate) * up ([..., F]), as HF's fused `gate_up_proj` (`.chunk(2, dim=-1)`)."""
  def glu(h):
    g, u = jnp.split(h, 2, axis=-1)
    return act(g) * u

  return glu


def expert_hidden(name: str, kind: str):
  """The function from wi·x to the expert's hidden activations, for expert kind "mlp" or "glu"."""
  if kind == "mlp":
    return activation(name)
  if kind == "glu":
    return gated(activation(name))
  raise ValueError(f"expert_kind must be 'mlp' or 'glu', got {kind!r}")
