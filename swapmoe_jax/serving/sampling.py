"""Next-token selection: greedy, or temperature / top-k / top-p sampling (HF logits-warper order)."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. Static under jit (hashable).

  temperature 0 (the default) means greedy. top_k 0 and top_p 1.0 disable those filters.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not isinstance(self.temperature, numbers.Real) or not 0 <= self.temperature < math.inf:
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r:.40}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r:.40}")
    if not isinstance(self.top_p, numbers.Real):
      raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r:.40}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def select(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """float32 logits [B, V] -> int32 tokens [B]."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k > 0:
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    # HF TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - top_p,
    # always keeping the most likely token.
    sorted_logits = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum <= (1.0 - sampling.top_p)
    remove = remove.at[..., -1].set(False)
    threshold = jnp.max(jnp.where(remove, sorted_logits, -jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits <= threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def tokens_until_eos(row: np.ndarray, eos_ids) -> int:
  """Generated tokens of one output row (host ids), up to and including its first EOS."""
  ends = np.flatnonzero(np.isin(row, np.asarray(eos_ids)))
  return int(ends[0]) + 1 if ends.size else int(row.shape[0])
