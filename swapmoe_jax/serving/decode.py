"""Jitted pure functions over the split model: forward, encode (+ cache), and one decode step.

The model is split once with `split_model` into a static graphdef and two states: `params` (dense
weights, routers, expert norms) and `slots` (expert slot buffers and index maps). Both states, the
caches and the host expert banks are *arguments* of every jitted function — never captured constants —
so swapping experts (new slot values, same shapes) never recompiles and weights are not baked in.

These programs belong to the runtime: they merge the split model, run its own step methods
(`encode`, `init_cache`, `decode_step`, `decode_full` of `models/switch/model.py`, the family's
encoder-decoder steps), and add what serving needs around them (sampling, EOS, several steps per call,
statistics accumulated for the swap controller).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from swapmoe_jax.moe import ExpertNorms, ExpertSlots, FallbackExperts, SelectiveThreshold, SlotIndex
from swapmoe_jax.serving import sampling as sampling_lib


def split_model(model):
  """-> (graphdef, params, slots). Selective routing's threshold and fallback routing's int8 expert
  copies go with the params: arguments of every program, like them, so a new value does not recompile
  and no weight is baked into a program."""
  return nnx.split(model, (nnx.Param, ExpertNorms, SelectiveThreshold, FallbackExperts), (ExpertSlots, SlotIndex))


@jax.tree_util.register_pytree_node_class
class Flat:
  """A pytree kept flattened: passing it to a jitted function costs a tuple, not a walk of the tree.

  Flattening an `nnx.State` of a switch-base model (~260 leaves) takes ~0.5 ms of Python per call — as
  long as a whole decode step on a GPU. Wrap the states once (`Flat.of(state)`); the jitted functions
  rebuild the tree inside the trace, where it costs nothing at run time.
  """

  def __init__(self, treedef, leaves):
    self.treedef = treedef
    self.leaves = tuple(leaves)

  @classmethod
  def of(cls, tree) -> "Flat":
    if isinstance(tree, Flat):
      return tree
    leaves, treedef = jax.tree.flatten(tree)
    return cls(treedef, leaves)

  def tree(self):
    return jax.tree.unflatten(self.treedef, self.leaves)

  def tree_flatten(self):
    return self.leaves, self.treedef

  @classmethod
  def tree_unflatten(cls, treedef, leaves):
    return cls(treedef, leaves)


def unflat(x):
  """The tree behind a `Flat`, or `x` itself."""
  return x.tree() if isinstance(x, Flat) else x


class Static:
  """A static jit argument hashed by identity: the graphdef, and the matmul precision of its programs.

  jit hashes its static arguments on every call: an `nnx.GraphDef` of a switch-base model takes ~2.3 ms
  to hash (and ~0.8 ms to compare) — three times a GPU decode step. Wrap it once per model.

  precision: None (JAX's default) or a `jax.default_matmul_precision` name that every program traced
  with this graphdef uses. The engine sets "highest" for float32 models: JAX's default multiplies
  float32 in TF32 on recent NVIDIA GPUs (and in one bfloat16 pass on TPUs), which put `full` 5 % away
  from HF float32 in logits on an H200; at "highest" it is float32.
  """

  __slots__ = ("value", "precision")

  def __init__(self, value, precision: str | None = None):
    self.value = value
    self.precision = precision

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, Static) and other.value is self.value


def _merge(graphdef, params, slots):
  if isinstance(graphdef, Static):
    graphdef = graphdef.value
  return nnx.merge(graphdef, unflat(params), unflat(slots))


def _numerics(graphdef):
  """The matmul precision a program traces under (see `Static`)."""
  precision = graphdef.precision if isinstance(graphdef, Static) else None
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, slots, input_ids, mask, decoder_input_ids, decoder_mask, banks):
  """Full teacher-forced pass. Returns float32 logits [B, T, V], encoder output [B, S, D] and stats."""
  with _numerics(graphdef):
    model = _merge(graphdef, params, slots)
    enc_h, enc_stats = model.encode(input_ids, mask, banks)
    logits, dec_stats = model.decode_full(decoder_input_ids, enc_h, mask, decoder_mask, banks)
  return logits, enc_h, (enc_stats, dec_stats)


@functools.partial(jax.jit, static_argnums=(0, 5))
def encode(graphdef, params, slots, input_ids, mask, max_len, banks):
  """Runs the encoder once and builds the decoder cache for `max_len` positions."""
  with _numerics(graphdef):
    model = _merge(graphdef, params, slots)
    enc_h, enc_stats = model.encode(input_ids, mask, banks)
    return model.init_cache(enc_h, mask, max_len), enc_stats


@functools.partial(jax.jit, static_argnums=(0, 10, 11, 12), donate_argnums=(5,))
def decode_step(graphdef, params, slots, tokens, done, cache, pos, key, banks, stats_sum, sampling, pad_id,
                eos_ids):
  """One generated token per row.

  tokens: int32[B] (previous tokens); done: bool[B] (rows that already emitted EOS); cache: donated;
  stats_sum: decoder LayerStats summed over the steps since the host last read them, so the host reads
  statistics once per window instead of synchronising every step (not donated: a window starts from
  one cached zero accumulator).
  pos: int32[] on the device (returned + 1, so the loop sends nothing to the device per step).
  Returns (next tokens int32[B] — pad for finished rows, done, cache, pos + 1, stats_sum + this step's
  stats).
  """
  with _numerics(graphdef):
    model = _merge(graphdef, params, slots)
    logits, cache, stats = model.decode_step(tokens, pos, cache, banks)
  nxt = sampling_lib.select(logits, jax.random.fold_in(key, pos), sampling)
  nxt = jnp.where(done, pad_id, nxt)
  done = done | jnp.isin(nxt, jnp.asarray(eos_ids, jnp.int32))
  return nxt, done, cache, pos + 1, jax.tree.map(jnp.add, stats_sum, stats)


@functools.partial(jax.jit, static_argnums=(0, 10, 11, 12, 13, 14), donate_argnums=(5,))
def decode_steps(graphdef, params, slots, tokens, done, cache, pos, key, banks, stats_sum, sampling, pad_id,
                 eos_ids, num_steps, skip_finished=True, remaining=None):
  """`num_steps` decode steps in one device call (a `lax.scan` of `decode_step`'s body).

  A switch-base decode step is ~300 small kernels: dispatched one call per token, the host's dispatch
  time (~1 ms) is as long as the step itself. One call per `num_steps` tokens removes it from all
  but one step in `num_steps`, and gives swaps staged between calls a whole call to land behind.
  Same arguments as `decode_step`. Returns (tokens int32[num_steps, B] in order, the last step's tokens
  int32[B] — the next call's input, returned so that the host does not slice it with two more device
  calls — done, cache, pos, stats_sum); rows already done are left out of the routing statistics.

  skip_finished (static): once every row has emitted EOS, the remaining steps skip the model (a
  `lax.cond`) and only emit pad. The host learns of EOS a couple of calls late (it never waits on the
  call it just dispatched), so without this the steps of up to three calls after the last EOS would run
  the whole model for tokens that are dropped; with it a request costs its tokens' steps plus a few
  empty ones. False: every step runs the model (as before).
  remaining: None, or int32 [] (traced: a new value does not recompile): the steps the request still
  needs; with `skip_finished`, steps from that index on skip the model too, so a request's last call
  (of `num_steps`, one program for every length) costs its needed steps only: max_new_tokens=20 in calls
  of 16 after a one-step first call ran 33 steps of the model, now 20.
  """
  model = _merge(graphdef, params, slots)
  eos = jnp.asarray(eos_ids, jnp.int32)

  def step(carry):
    tokens, done, cache, pos, acc = carry
    # Rows that have finished only pad: they stay out of the routing statistics.
    logits, cache, stats = model.decode_step(tokens, pos, cache, banks, live=~done)
    nxt = sampling_lib.select(logits, jax.random.fold_in(key, pos), sampling)
    nxt = jnp.where(done, pad_id, nxt)
    done = done | jnp.isin(nxt, eos)
    return nxt, done, cache, pos + 1, jax.tree.map(jnp.add, acc, stats)

  def skip(carry):
    tokens, done, cache, pos, acc = carry
    return jnp.full_like(tokens, pad_id), done, cache, pos + 1, acc

  def body(carry, i):
    if skip_finished:
      idle = jnp.all(carry[1]) if remaining is None else jnp.all(carry[1]) | (i >= remaining)
      carry = jax.lax.cond(idle, skip, step, carry)
    else:
      carry = step(carry)
    return carry, carry[0]

  with _numerics(graphdef):
    (last, done, cache, pos, stats_sum), out = jax.lax.scan(body, (tokens, done, cache, pos, stats_sum),
                                                             jnp.arange(num_steps, dtype=jnp.int32))
  return out, last, done, cache, pos, stats_sum


# --- decoder-only families -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def causal_forward(graphdef, params, slots, input_ids, mask, banks):
  """A decoder-only model over whole sequences. Returns float32 logits [B, T, V] and stacked LayerStats."""
  with _numerics(graphdef):
    model = _merge(graphdef, params, slots)
    return model.forward(input_ids, mask, banks)


@functools.partial(jax.jit, static_argnums=(0, 5, 8, 9, 10))
def prefill(graphdef, params, slots, input_ids, mask, max_len, key, banks, sampling, pad_id, eos_ids):
  """A decoder-only model's prompt (left-padded, [B, S]) into a fresh cache of `max_len` positions, and
  its first generated token: the request's first token comes out of its first device call.

  Returns (first tokens int32[B], done bool[B], cache, stacked LayerStats of the prompt).
  """
  with _numerics(graphdef):
    model = _merge(graphdef, params, slots)
    cache = model.init_cache(input_ids.shape[0], max_len)
    logits, cache, stats = model.prefill(input_ids, mask, cache, banks)
  first = sampling_lib.select(logits, jax.random.fold_in(key, input_ids.shape[1] - 1), sampling)
  del pad_id  # every row has a last prompt token: none is finished before its first token
  return first, jnp.isin(first, jnp.asarray(eos_ids, jnp.int32)), cache, stats


def prompt_length(length: int) -> int:
  """Prompt positions a decoder-only request occupies: rounded up to a multiple of 16 (left padding), so
  that nearby prompt lengths share one compiled prefill and one decode program."""
  return max(16, -(-length // 16) * 16)


def zero_stats(num_layers: int, num_experts: int):
  """LayerStats of zeros, [L, E] (an empty accumulator for `decode_step`)."""
  from swapmoe_jax.moe.router import LayerStats

  return LayerStats(importance=jnp.zeros((num_layers, num_experts), jnp.float32),
                    wanted=jnp.zeros((num_layers, num_experts), jnp.int32),
                    served=jnp.zeros((num_layers, num_experts), jnp.int32),
                    redirected=jnp.zeros((num_layers,), jnp.int32), misses=jnp.zeros((num_layers,), jnp.int32),
                    from_bank=jnp.zeros((num_layers,), jnp.int32),
                    missed_experts=jnp.zeros((num_layers,), jnp.int32))


def cache_length(max_new_tokens: int) -> int:
  """Decoder cache positions for a request: rounded up to a multiple of 64, so that nearby
  `max_new_tokens` share one compiled step."""
  return max(64, -(-max_new_tokens // 64) * 64)
