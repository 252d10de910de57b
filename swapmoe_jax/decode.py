"""Jitted pure functions over the split model: forward, encode (+ cache), and one decode step.

The model is split once with `split_model` into a static graphdef and two states: `params` (dense
weights, routers, expert norms) and `slots` (expert slot buffers and index maps). Both states, the
caches and the host expert banks are *arguments* of every jitted function — never captured constants —
so swapping experts (new slot values, same shapes) never recompiles and weights are not baked in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from swapmoe_jax import sampling as sampling_lib
from swapmoe_jax.moe import ExpertNorms, ExpertSlots, SlotIndex


def split_model(model):
  """-> (graphdef, params, slots)."""
  return nnx.split(model, (nnx.Param, ExpertNorms), (ExpertSlots, SlotIndex))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, slots, input_ids, mask, decoder_input_ids, decoder_mask, banks):
  """Full teacher-forced pass. Returns float32 logits [B, T, V], encoder output [B, S, D] and stats."""
  model = nnx.merge(graphdef, params, slots)
  enc_h, enc_stats = model.encode(input_ids, mask, banks)
  logits, dec_stats = model.decode_full(decoder_input_ids, enc_h, mask, decoder_mask, banks)
  return logits, enc_h, (enc_stats, dec_stats)


@functools.partial(jax.jit, static_argnums=(0, 5))
def encode(graphdef, params, slots, input_ids, mask, max_len, banks):
  """Runs the encoder once and builds the decoder cache for `max_len` positions."""
  model = nnx.merge(graphdef, params, slots)
  enc_h, enc_stats = model.encode(input_ids, mask, banks)
  return model.init_cache(enc_h, mask, max_len), enc_stats


@functools.partial(jax.jit, static_argnums=(0, 9, 10, 11), donate_argnums=(5,))
def decode_step(graphdef, params, slots, tokens, done, cache, pos, key, banks, sampling, pad_id, eos_ids):
  """One generated token per row.

  tokens: int32[B] (previous tokens); done: bool[B] (rows that already emitted EOS); cache: donated.
  Returns (next tokens int32[B] — pad for finished rows, done, cache, decoder stats).
  """
  model = nnx.merge(graphdef, params, slots)
  logits, cache, stats = model.decode_step(tokens, pos, cache, banks)
  nxt = sampling_lib.select(logits, jax.random.fold_in(key, pos), sampling)
  nxt = jnp.where(done, pad_id, nxt)
  done = done | jnp.isin(nxt, jnp.asarray(eos_ids, jnp.int32))
  return nxt, done, cache, stats


def cache_length(max_new_tokens: int) -> int:
  """Decoder cache positions for a request: rounded up to a multiple of 64, so that nearby
  `max_new_tokens` share one compiled step."""
  return max(64, -(-max_new_tokens // 64) * 64)
