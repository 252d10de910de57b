"""Expert FFNs computed from a fixed-shape slot buffer, and exact-routing misses from host memory.

Two dispatch implementations, chosen by the (static) token count:
- gather: each token gathers its expert's weights by slot — few tokens (decode steps);
- grouped: tokens sorted by slot and multiplied with `lax.ragged_dot` — many tokens (prefill).
Both compute the same function; a test asserts they agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GATHER_MAX_TOKENS = 16


def _ffn_gather(x, slot, wi, wo, act):
  """x: [N, D]; slot: int32[N] (valid); wi: [K, D, F]; wo: [K, F, D] -> [N, D]."""
  h = act(jnp.einsum("nd,ndf->nf", x, wi[slot]))
  return jnp.einsum("nf,nfd->nd", h, wo[slot])


def _ffn_grouped(x, slot, wi, wo, act):
  num_slots = wi.shape[0]
  order = jnp.argsort(slot, stable=True)
  group_sizes = jnp.bincount(slot, length=num_slots).astype(jnp.int32)
  xs = x[order]
  h = act(jax.lax.ragged_dot(xs, wi, group_sizes))
  ys = jax.lax.ragged_dot(h.astype(wo.dtype), wo, group_sizes)
  return jnp.zeros_like(ys).at[order].set(ys)


def expert_ffn(x: jax.Array, slot: jax.Array, wi: jax.Array, wo: jax.Array, act, *, grouped: bool | None = None):
  """Each token through the expert in its slot. x: [N, D]; slot: int32[N] in [0, K). Returns [N, D]."""
  if grouped is None:
    grouped = x.shape[0] > GATHER_MAX_TOKENS
  return (_ffn_grouped if grouped else _ffn_gather)(x, slot, wi, wo, act)


def _to_device(x: jax.Array) -> jax.Array:
  return jax.device_put(x, jax.memory.Space.Device)


def expert_ffn_misses(
    x: jax.Array,
    expert: jax.Array,
    miss: jax.Array,
    bank_wi: jax.Array,
    bank_wo: jax.Array,
    act,
) -> jax.Array:
  """Tokens whose expert is not resident, served from the host bank inside the step (exact routing).

  x: [N, D]; expert: int32[N]; miss: bool[N]; bank_wi: [E, D, F]; bank_wo: [E, F, D] (host memory, e.g.
  `pinned_host`). Only missing experts are copied: per token for few tokens, per expert otherwise.
  Returns [N, D], zero for tokens that are not misses.
  """
  n, d = x.shape
  if n <= GATHER_MAX_TOKENS:
    def fetch(_):
      wi = jnp.stack([_to_device(jax.lax.dynamic_index_in_dim(bank_wi, expert[i], keepdims=False)) for i in range(n)])
      wo = jnp.stack([_to_device(jax.lax.dynamic_index_in_dim(bank_wo, expert[i], keepdims=False)) for i in range(n)])
      h = act(jnp.einsum("nd,ndf->nf", x, wi))
      return jnp.einsum("nf,nfd->nd", h, wo)

    y = jax.lax.cond(jnp.any(miss), fetch, lambda _: jnp.zeros_like(x), None)
    return jnp.where(miss[:, None], y, 0)

  def body(acc, e):
    sel = miss & (expert == e)

    def compute(_):
      wi = _to_device(jax.lax.dynamic_index_in_dim(bank_wi, e, keepdims=False))
      wo = _to_device(jax.lax.dynamic_index_in_dim(bank_wo, e, keepdims=False))
      return jnp.where(sel[:, None], act(x @ wi) @ wo, 0).astype(x.dtype)

    return acc + jax.lax.cond(jnp.any(sel), compute, lambda _: jnp.zeros_like(x), None), None

  acc, _ = jax.lax.scan(body, jnp.zeros_like(x), jnp.arange(bank_wi.shape[0], dtype=jnp.int32))
  return acc
