"""The objects `swapmoe_jax.load` returns: `SwitchModel` (encoder-decoder) and `CausalLM` (decoder-only
families). Call one for logits, or `generate` tokens; both share the decode loop of `ServedModel`."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swapmoe_jax.serving import decode
from swapmoe_jax.serving.sampling import Sampling


# Decode steps per device call in `generate` (see `decode.decode_steps`).
DEFAULT_STEPS_PER_CALL = 16
_EMIT_LAG_CALLS = 2


def _ready(x) -> bool:
  """Whether device array `x` has been computed (host arrays always have)."""
  return x.is_ready() if isinstance(x, jax.Array) else True


class InputError(ValueError):
  """Bad input ids or masks."""


def positive_int(name: str, value) -> int:
  """`value` as an int; InputError unless it is an integer >= 1 (not a bool, not a float)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
    raise InputError(f"{name} must be an integer >= 1, got {value!r:.40}")
  return int(value)


def _array(x, name: str) -> np.ndarray:
  try:
    return np.asarray(x)
  except (ValueError, TypeError) as e:  # ragged nested lists
    raise InputError(f"{name} must be a rectangular array [batch, length]: {e}") from None


def _as_ids(x, name: str, vocab_size: int) -> np.ndarray:
  a = _array(x, name)
  if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
    raise InputError(f"{name} must be an integer array, got dtype {a.dtype}")
  if a.ndim == 1:
    a = a[None]
  if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
    raise InputError(f"{name} must have shape [batch, length] with batch, length >= 1, got {a.shape}")
  if a.size and (a.min() < 0 or a.max() >= vocab_size):
    raise InputError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): min {a.min()}, max {a.max()}")
  return a.astype(np.int32)


def _as_mask(mask, ids: np.ndarray, name: str) -> np.ndarray:
  if mask is None:
    return np.ones(ids.shape, bool)
  m = _array(mask, name)
  if m.ndim == 1:
    m = m[None]
  if m.shape != ids.shape:
    raise InputError(f"{name} has shape {m.shape}, expected {ids.shape}")
  if m.dtype != bool and not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
    raise InputError(f"{name} must hold booleans or 0/1, got dtype {m.dtype}")
  empty = np.flatnonzero(~m.astype(bool).any(axis=1))
  if empty.size:
    raise InputError(f"{name} masks every position of row {int(empty[0])}: each row needs a token")
  return m.astype(bool)


class ServedModel:
  """A loaded model under a residency policy. Weights are split once into (graphdef, params, slots).

  Attributes: config, dtype, graphdef, params, slots, store (host experts), tokenizer (or None),
  policy (residency policy name), steps_per_call (decode steps per device call in `generate`).
  """

  def __init__(self, config, graphdef, params, slots, *, dtype, store=None, tokenizer=None,
               policy: str = "full", banks=None, meta: Any = None, residency=None, plan=None, limits=None,
               steps_per_call: int = DEFAULT_STEPS_PER_CALL, selective_encoder: bool = True):
    self.config = config
    self.dtype = dtype
    self.graphdef = graphdef
    # hashed by identity on every jitted call; float32 computes in float32 (see `decode.Static`)
    self._graphdef = decode.Static(graphdef, "highest" if jnp.dtype(dtype) == jnp.float32 else None)
    self._params = decode.Flat.of(params)  # flat: cheap to pass to every jitted call
    self._slots = decode.Flat.of(slots)
    self.store = store
    self.tokenizer = tokenizer
    self.policy = policy
    self._banks = banks
    self.meta = meta
    self.residency = residency
    self._zeros = None
    self._consts = {}  # small device arrays reused by every request (`_const`)
    self.plan = plan
    self.limits = limits  # {"batch", "src_len", "tgt_len"} the budget was planned for, or None
    self.steps_per_call = check_steps_per_call(steps_per_call)  # generate's default
    self.skip_finished = True  # decode steps after every row's EOS skip the model (`decode.decode_steps`)
    self.selective_encoder = selective_encoder  # policy "selective": False keeps the encoder masked (`load`)

  @property
  def params(self):
    """Dense weights, routers and expert norms (an `nnx.State`)."""
    return self._params.tree()

  @property
  def slots(self):
    """Expert slot buffers and index maps (an `nnx.State`); swaps replace it."""
    return self._slots.tree()

  @slots.setter
  def slots(self, value):
    self._slots = decode.Flat.of(value)

  def set_selective_threshold(self, threshold: float) -> None:
    """Sets every MoE layer's threshold (policy "selective": a miss whose router probability is >=
    `threshold` is read from the host bank, the others redirected). The threshold is a parameter of the
    compiled programs, not a constant in them: the new value, on the old one's device, recompiles nothing.
    With `selective_encoder` False (`load`), the encoder's layers stay masked: only the others change."""
    from swapmoe_jax.serving.residency import check_selective_threshold

    threshold = check_selective_threshold(self.policy, threshold)
    leaves = list(self._params.leaves)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(self._params.tree())[0]]
    found = False
    for i, path in enumerate(paths):
      if jax.tree_util.DictKey("selective_threshold") in path:
        if not self.selective_encoder and jax.tree_util.DictKey("encoder") in path:
          continue
        old = leaves[i]
        value = np.asarray(threshold, old.dtype)
        # Committed only where the old leaf was (one-device params are not, mesh ones are): a committed
        # argument in place of an uncommitted one is another signature of every program, and a compile.
        # (`jax.device_put` without a device: `jnp.asarray` of a 0-d array compiles a small program.)
        leaves[i] = jax.device_put(value, old.sharding if old._committed else None)
        found = True
    if not found:
      raise ValueError(f"policy {self.policy!r} has no selective threshold")
    self._params = decode.Flat(self._params.treedef, leaves)

  @property
  def stats(self):
    """Telemetry of this model's calls so far (`print(model.stats)`), or None without a policy."""
    return None if self.residency is None else self.residency.telemetry

  def pin_experts(self, resident) -> None:
    """Sets the resident experts between requests: `resident` gives, per MoE layer (encoder layers
    first, as `config.moe_layers`), the K_l distinct expert ids in [0, E) to hold, in any order.

    The experts are copied into the slots as the policy's own swaps are (`Residency.pin`): the slot
    buffers, index maps, controller state and `stats` stay in agreement, and the copies count as
    swapped experts. Only values change: no decode program recompiles. A static policy (`pruned`)
    keeps the pinned set until the next pin; a dynamic one (`swapmoe`, `lru`, `lfu`) keeps its scores
    and may move away from it at its next observation, within the request that follows.
    Raises ValueError on a bad `resident` (wrong number of layers, not K_l distinct ids in range).
    """
    if self.residency is None:
      raise ValueError("this model has no residency policy: nothing to pin")
    max_writes = self.plan.max_swaps_per_step if self.plan is not None else 1
    self._slots = self.residency.pin(self._slots, resident, self.store, max_writes)

  def _before_request(self, ids, mask):
    if self.residency is not None:
      self._slots = self.residency.before_request(self._slots, ids, mask)

  def _after_prefill(self, enc, dec=None, issue: bool = True):
    if self.residency is not None:
      self._slots = self.residency.after_prefill(self._slots, enc, dec, issue)

  def _flush(self, stats_sum=None):
    if self.residency is not None:
      self._slots = self.residency.flush(self._slots, stats_sum)

  def _zero_stats(self):
    if self._zeros is None:  # created once: a fresh one per window would compile small programs on first use
      self._zeros = self._put(decode.zero_stats(len(self.config.decoder_sparse_layers), self.config.num_experts))
    return self._zeros

  def _const(self, key, make):
    """A small device array made once per `key` and reused by later requests: a request's start tokens,
    finished flags, first position and PRNG key. On a GPU each `device_put` costs 0.2-0.6 ms of host time
    and `jax.random.key` 0.9 ms, all on the first token's path. No jitted call donates these arguments,
    so sharing them between requests is safe."""
    value = self._consts.get(key)
    if value is None:
      if len(self._consts) >= 64:  # many seeds or batch sizes: start over rather than grow
        self._consts.clear()
      value = self._consts[key] = self._put(make())
    return value

  def _put(self, x):
    """Commits arrays to the model's device: the jitted step's outputs are committed, so inputs made
    with jnp.zeros & co. (uncommitted) would give the step a second signature and a second compile."""
    return jax.device_put(x, self._params.leaves[0].sharding)

  def _check_limits(self, ids: np.ndarray, max_new_tokens: int | None = None):
    if not self.limits:
      return
    b, s = ids.shape
    lim = self.limits
    if b > lim["batch"] or s > lim["src_len"] or (
        max_new_tokens is not None and decode.cache_length(max_new_tokens) > lim["tgt_len"]):
      raise InputError(
          f"request (batch {b}, source length {s}, max_new_tokens {max_new_tokens}) exceeds what the budget "
          f"was planned for (batch {lim['batch']}, source length {lim['src_len']}, cache {lim['tgt_len']}); "
          "pass larger max_batch_size / max_source_len / max_new_tokens to load()")

  def _check_cache_fits(self, ids: np.ndarray, max_new_tokens: int):
    """Without planned limits, refuses a request whose decoder cache alone exceeds the device's memory
    (XLA would abort the process on such shapes, or run out of memory halfway)."""
    from swapmoe_jax.serving import budget as budget_lib

    if self.limits:
      return
    tgt = decode.cache_length(max_new_tokens)
    if tgt >= 2**31:  # positions are int32 on the device
      raise InputError(f"max_new_tokens must be below {2**31 - 64}, got {max_new_tokens}")
    b, s = ids.shape
    need = budget_lib.kv_cache_bytes(self.config, np.dtype(self.dtype).itemsize, b, s, tgt)
    limit = budget_lib.device_memory_bytes(next(iter(self._params.leaves[0].devices())))
    if limit is not None and need > limit:
      raise InputError(f"max_new_tokens {max_new_tokens} needs a decoder cache of {budget_lib.format_bytes(need)} "
                       f"for batch {b}, source length {s}: more than the device's {budget_lib.format_bytes(limit)}")

  # --- the decode loop, shared by the families ---------------------------------------------------
  def _decode(self, cache, tokens, done, pos, key, sampling, *, chunk: int, steps: int, max_new_tokens: int,
              stream, out: list, first_alone: bool = False) -> np.ndarray:
    """Runs `steps` decode steps in calls of `chunk` after the prefill, and returns the generated ids.

    tokens, done, pos: the device state after the prefill (the last token of every row, finished rows,
    the next cache position); out: entries (tokens [n, B], done [B]) already produced (the prefill's
    first token for a decoder-only model), which count towards `max_new_tokens`. first_alone: the
    first call runs one step, so that the first token reaches the host (and `stream`) without waiting
    for `chunk` steps; a request's last call may then run past the cache, whose writes are clamped to
    its last position (`dynamic_update_slice`) by steps whose tokens are dropped.
    """
    cfg = self.config
    stats_sum = None
    emitted, step, finished = 0, 0, False
    first = 1 if first_alone and chunk > 1 and steps > 1 else 0
    # Entries produced before the loop (a decoder-only prefill's token) and the one-step first call's
    # are handed out at once, before the next call is dispatched: a GPU call's kernels are launched on
    # this thread (~0.5 ms a step), so waiting for the next call's dispatch would hold the first token
    # back by a whole call. Later entries are handed out `_EMIT_LAG_CALLS` calls late, and all of them
    # when nobody streams (waiting on the first call would leave the device idle while the next launches).
    ready = len(out) + first if stream is not None else 0
    while not finished and emitted < min(ready, len(out)):
      finished, step = self._emit(out[emitted], step, max_new_tokens, stream)
      emitted += 1
    dispatched = 0  # steps of the calls so far; a call's steps past `steps` skip the model
    calls = [] if finished else [1] * first + [chunk] * -(-(steps - first) // chunk)
    for n in calls:
      toks, tokens, done, cache, pos, stats_sum = decode.decode_steps(
          self._graphdef, self._params, self._slots, tokens, done, cache, pos, key, self._banks,
          stats_sum if stats_sum is not None else self._zero_stats(), sampling, cfg.pad_token_id,
          cfg.eos_token_ids, n, self.skip_finished, np.int32(steps - dispatched))
      dispatched += n
      out.append((toks, done))
      # The host reads a call's results `_EMIT_LAG_CALLS` calls late: that call has finished (or is about
      # to) while later ones are queued, so waiting for it never leaves the device idle. The first
      # token is handed out before the residency issues this call's swaps (their staging is host work).
      # Later calls' results are also read as soon as they are ready (`is_ready` does not wait): a
      # request whose rows have all ended then stops a call sooner than the lag alone allows (on an H200
      # the lag alone left a request that ended after 5 tokens 8.4 ms behind one asked for 5, session 31).
      due = max(len(out) - _EMIT_LAG_CALLS, min(ready, len(out)))
      while not finished and emitted < len(out) and (emitted < due or _ready(out[emitted][1])):
        finished, step = self._emit(out[emitted], step, max_new_tokens, stream)
        emitted += 1
      if finished:  # every row had emitted EOS: the calls after that one only padded
        del out[emitted:]
        break
      if self.residency is not None:
        self._slots, stats_sum = self.residency.after_step(self._slots, stats_sum, steps=n)
    while not finished and emitted < len(out):
      finished, step = self._emit(out[emitted], step, max_new_tokens, stream)
      emitted += 1
    self._flush(stats_sum)
    toks = np.concatenate(jax.device_get([t for t, _ in out]), axis=0).T[:, :max_new_tokens]
    return _trim_finished(toks, cfg.eos_token_ids)

  @staticmethod
  def _emit(entry, step: int, max_new_tokens: int, stream) -> tuple[bool, int]:
    """Hands one entry's tokens (steps `step`, `step + 1`, ...) to `stream`. Returns whether every row
    had emitted EOS by its end, and the next step."""
    toks, done = entry
    n = toks.shape[0]
    if stream is not None:
      toks, done = jax.device_get((toks, done))  # both copies in flight at once (~0.4 ms each on a GPU)
      for j in range(min(n, max_new_tokens - step)):
        stream(step + j, toks[j])
    return bool(np.asarray(done).all()), step + n

  def _generate_args(self, input_ids, attention_mask, max_new_tokens, steps_per_call, seed, temperature, top_k,
                     top_p):
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    chunk = check_steps_per_call(self.steps_per_call if steps_per_call is None else steps_per_call)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
      raise InputError(f"seed must be an integer, got {seed!r:.40}")
    ids = _as_ids(input_ids, "input_ids", self.config.vocab_size)
    mask = _as_mask(attention_mask, ids, "attention_mask")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return max_new_tokens, chunk, ids, mask, sampling


class SwitchModel(ServedModel):
  """A loaded Switch Transformer (encoder-decoder)."""

  # --- teacher-forced logits -----------------------------------------------------------------
  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
    """Logits float32 [B, T, V] for `decoder_input_ids` (default: the decoder start token alone)."""
    ids = _as_ids(input_ids, "input_ids", self.config.vocab_size)
    mask = _as_mask(attention_mask, ids, "attention_mask")
    if decoder_input_ids is None:
      dec = np.full((ids.shape[0], 1), self.config.decoder_start_token_id, np.int32)
    else:
      dec = _as_ids(decoder_input_ids, "decoder_input_ids", self.config.vocab_size)
    if dec.shape[0] != ids.shape[0]:
      raise InputError(f"decoder_input_ids has batch {dec.shape[0]}, input_ids has {ids.shape[0]}")
    dmask = None if decoder_attention_mask is None else _as_mask(decoder_attention_mask, dec, "decoder_attention_mask")
    self._check_limits(ids)
    self._before_request(ids, mask)
    logits, _, (enc_stats, dec_stats) = decode.forward(
        self._graphdef, self._params, self._slots, ids, mask, dec, dmask, self._banks)
    self._after_prefill(enc_stats, dec_stats)
    self._flush()
    return logits

  def encode(self, input_ids, attention_mask=None):
    """Encoder output [B, S, D]."""
    ids = _as_ids(input_ids, "input_ids", self.config.vocab_size)
    mask = _as_mask(attention_mask, ids, "attention_mask")
    dec = np.full((ids.shape[0], 1), self.config.decoder_start_token_id, np.int32)
    _, enc_h, _ = decode.forward(self._graphdef, self._params, self._slots, ids, mask, dec, None, self._banks)
    return enc_h

  # --- generation ----------------------------------------------------------------------------
  def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None,
               steps_per_call: int | None = None) -> np.ndarray:
    """Generated ids int32 [B, <=max_new_tokens], without the decoder start token; rows that finished
    early are padded with the pad id, and generation stops once every row has emitted EOS (as HF does).

    stream: optional callable(step, tokens np.int32[B]) called as tokens are produced (they reach the
      host a device call at a time; the first token alone, from a call of one step after the encoder).
    steps_per_call: decode steps per device call after the first (default `self.steps_per_call`), a
      divisor of 64. Swaps are committed between calls. 1 gives one call per token.
    """
    max_new_tokens, chunk, ids, mask, sampling = self._generate_args(
        input_ids, attention_mask, max_new_tokens, steps_per_call, seed, temperature, top_k, top_p)
    self._check_limits(ids, max_new_tokens)
    self._check_cache_fits(ids, max_new_tokens)
    cfg = self.config
    # A first call of one step, then whole calls of `chunk` steps; the last call's extra steps (their
    # tokens dropped) write the cache's last position at most (see `_decode`).
    self._before_request(ids, mask)
    cache, enc_stats = decode.encode(self._graphdef, self._params, self._slots, ids, mask,
                                     decode.cache_length(max_new_tokens), self._banks)
    if self.residency is not None and self.residency.prefill_refit is not None:
      # Prefill-informed residency: the encoder ran on residents that its own routing says are wrong
      # for this request; refit them and run it again (only when it moved experts).
      self._slots, moved = self.residency.refit_to_prefill(self._slots, enc_stats)
      if moved:
        cache, enc_stats = decode.encode(self._graphdef, self._params, self._slots, ids, mask,
                                         decode.cache_length(max_new_tokens), self._banks)
    self._after_prefill(enc_stats, issue=False)  # swaps wait until the first token is out
    b = ids.shape[0]
    tokens = self._const(("start", b), lambda: np.full((b,), cfg.decoder_start_token_id, np.int32))
    done = self._const(("done", b), lambda: np.zeros((b,), bool))
    key = self._const(("key", seed), lambda: jax.random.key(seed))
    pos = self._const(("pos", 0), lambda: np.zeros((), np.int32))
    return self._decode(cache, tokens, done, pos, key, sampling, chunk=chunk, steps=max_new_tokens,
                        max_new_tokens=max_new_tokens, stream=stream, out=[], first_alone=True)


def check_steps_per_call(n) -> int:
  """`n` as an int; InputError unless it divides 64 (cache lengths are multiples of 64)."""
  n = positive_int("steps_per_call", n)
  if 64 % n:
    raise InputError(f"steps_per_call must divide 64 (1, 2, 4, 8, 16, 32 or 64), got {n}")
  return n


def _trim_finished(toks: np.ndarray, eos_ids) -> np.ndarray:
  """Drops the columns after the step at which every row had emitted EOS (HF stops there)."""
  is_eos = np.isin(toks, np.asarray(eos_ids))
  if not is_eos.any(axis=1).all():
    return toks
  last = int(is_eos.argmax(axis=1).max())
  return toks[:, : last + 1]


class CausalLM(ServedModel):
  """A loaded decoder-only MoE language model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

  `model(input_ids, attention_mask=None)` gives logits [B, T, V]; `model.generate(...)` only the new tokens.
  Prompts are left-padded on the host (a right-padded batch is realigned, as HF expects left padding
  for generation) to a multiple of 16 positions (`decode.prompt_length`).
  """

  def __call__(self, input_ids, attention_mask=None):
    """Logits float32 [B, T, V] of every position (positions count only unmasked tokens, as HF's
    `position_ids` from the attention mask)."""
    ids = _as_ids(input_ids, "input_ids", self.config.vocab_size)
    mask = _as_mask(attention_mask, ids, "attention_mask")
    self._check_limits(ids)
    self._before_request(ids, mask)
    logits, stats = decode.causal_forward(self._graphdef, self._params, self._slots, ids, mask, self._banks)
    self._after_prefill(None, stats)
    self._flush()
    return logits

  def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None,
               steps_per_call: int | None = None) -> np.ndarray:
    """The new tokens int32 [B, <=max_new_tokens] (the prompt is not repeated); rows that finished early
    are padded with the pad id, and generation stops once every row has emitted EOS (as HF does).

    The first token comes from the prompt's own device call (`stream` sees it before any decode step
    runs); then calls of `steps_per_call` steps. Other arguments: see `SwitchModel.generate`.
    """
    max_new_tokens, chunk, ids, mask, sampling = self._generate_args(
        input_ids, attention_mask, max_new_tokens, steps_per_call, seed, temperature, top_k, top_p)
    cfg = self.config
    ids, mask = left_pad(ids, mask, cfg.pad_token_id, decode.prompt_length(ids.shape[1]))
    self._check_limits(ids, max_new_tokens)
    self._check_cache_fits(ids, max_new_tokens)
    s = ids.shape[1]
    key = self._const(("key", seed), lambda: jax.random.key(seed))
    self._before_request(ids, mask)
    first, done, cache, stats = decode.prefill(
        self._graphdef, self._params, self._slots, ids, mask, s + decode.cache_length(max_new_tokens), key,
        self._banks, sampling, cfg.pad_token_id, cfg.eos_token_ids)
    self._after_prefill(None, stats, issue=False)  # swaps wait until the first token is out
    pos = self._const(("pos", s), lambda: np.asarray(s, np.int32))
    return self._decode(cache, first, done, pos, key, sampling, chunk=chunk, steps=max_new_tokens - 1,
                        max_new_tokens=max_new_tokens, stream=stream, out=[(first[None], done)])


def left_pad(ids: np.ndarray, mask: np.ndarray, pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's unmasked tokens, in order, at the right end of `length` positions (pad ids on the left)."""
  b, s = ids.shape
  if s > length:
    raise ValueError(f"length {length} is shorter than the prompts ({s})")
  out = np.full((b, length), pad_id, np.int32)
  out_mask = np.zeros((b, length), bool)
  for r in range(b):
    row = ids[r][mask[r]]
    out[r, length - row.size:] = row
    out_mask[r, length - row.size:] = True
  return out, out_mask
