"""Serving-time glue between the device step and the host policy: statistics in, slot writes out.

After each device call is dispatched, `Residency.after_step` (1) reads the routing statistics of the
windows that closed `READ_LAG_CALLS` calls ago (their copies to the host started when they closed, so
they have arrived; later calls are queued, so the device stays busy), (2) lets the controller learn from them, and (3) stages and commits up to
`max_swaps_per_step` expert writes, which the next call sees. Nothing here blocks on the call just
dispatched.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.serving.executor import SwapExecutor
from swapmoe_jax.serving.stats import RoutingStats, StepRecord, Telemetry
from swapmoe_jax.serving.swap import (
    IMPORTANCE_POLICIES, ResidencyError, SlotWrite, SwapController, rank_by_score)

EXACT_POLICIES = ("lru", "lfu")
# Selective routing: misses above a threshold read from the host bank (as exact policies do), the others
# redirected (as masked policies do); swaps as "swapmoe".
SELECTIVE_POLICIES = ("selective",)
# Fallback routing (HOBBIT): misses computed from int8 copies of every expert kept on the device (no
# bank, no redirect); swaps as "swapmoe".
FALLBACK_POLICIES = ("fallback",)
# A closed window's statistics start their copy to the host when it closes (`StatsRead`) and are read
# this many decode calls after the call that closed it, when they have arrived: the read does not wait
# for the device, which keeps the calls queued since busy.
READ_LAG_CALLS = 2
MASKED_POLICIES = ("swapmoe", "pruned")


def check_selective_threshold(policy: str, threshold) -> float:
  """The threshold `policy` is served with: the default (`moe.layer.DEFAULT_SELECTIVE_THRESHOLD`) for
  "selective" when None; a ValueError for a threshold given to another policy (it would be silently
  ignored), or one that is not a number >= 0."""
  from swapmoe_jax.moe.layer import DEFAULT_SELECTIVE_THRESHOLD

  if threshold is None:
    return DEFAULT_SELECTIVE_THRESHOLD
  if policy not in SELECTIVE_POLICIES:
    raise ValueError(f"selective_threshold applies to policy 'selective' only, not {policy!r}")
  if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)):
    raise ValueError(f"selective_threshold must be a number, got {threshold!r:.40}")
  if not threshold >= 0:  # NaN too
    raise ValueError(f"selective_threshold must be >= 0, got {threshold}")
  return float(threshold)


def check_prefill_refit(policy: str, value, swaps: bool) -> float | None:
  """`load(prefill_refit=)`: None, or a fraction in [0, 1) of a request's encoder tokens redirected
  above which the encoder is refitted (policies that swap: swapmoe, selective, fallback)."""
  if value is None:
    return None
  if policy not in IMPORTANCE_POLICIES:
    raise ValueError(f"prefill_refit applies to policies swapmoe, selective and fallback, not {policy!r}")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"prefill_refit must be a number, got {value!r:.40}")
  if not 0 <= value < 1:  # NaN too
    raise ValueError(f"prefill_refit must be in [0, 1), got {value}")
  if not swaps:
    raise ValueError("prefill_refit needs swaps (max_swaps_per_step > 0)")
  return float(value)


@jax.jit
def _packed(parts):
  """Every leaf of device LayerStats (parts may be None) in one float32 vector, int32 leaves bitcast
  (exact), so that the host reads them in one transfer instead of one per leaf (~0.17 ms of host time
  each on a GPU, 14 a window: on the path between two decode calls)."""
  flat = [(x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
           else jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.float32)).ravel() for x in jax.tree.leaves(parts)]
  return jnp.concatenate(flat)


class StatsRead:
  """A device->host read of statistics (a tree of device LayerStats, None allowed), started when made:
  `_packed` is queued on the device right behind the call that produced them and its one vector is
  copied to the host asynchronously. `Residency` starts a read as soon as a window closes and reads it
  `READ_LAG_CALLS` calls later, when it has long arrived. (Packed at read time instead, the vector
  queued behind the call just dispatched, and the read waited for that whole call: the device then
  sat idle from the call's end until the host had planned and dispatched the next.)"""

  __slots__ = ("_flat", "_leaves", "_treedef", "_host")

  def __init__(self, parts):
    leaves, self._treedef = jax.tree.flatten(parts)
    self._flat = self._host = None
    if leaves and all(isinstance(x, jax.Array) for x in leaves):
      self._leaves = [(x.shape, jnp.issubdtype(x.dtype, jnp.floating)) for x in leaves]
      self._flat = _packed(parts)
      self._flat.copy_to_host_async()
    else:
      self._host = jax.device_get(parts)

  def get(self):
    """The same tree of numpy arrays (waits only where the copy has not arrived yet)."""
    if self._host is None:
      flat = np.asarray(self._flat)
      out, at = [], 0
      for shape, floating in self._leaves:
        n = int(np.prod(shape))
        chunk = flat[at:at + n]
        at += n
        out.append((chunk if floating else chunk.view(np.int32)).reshape(shape))
      self._host, self._flat = jax.tree.unflatten(self._treedef, out), None
    return self._host


def _to_host(parts):
  """Device LayerStats (a tuple of them, None allowed) -> the same tree of numpy arrays, in one read."""
  return StatsRead(parts).get()


def routing_stats(cfg: SwitchConfig, enc=None, dec=None) -> RoutingStats:
  """Device LayerStats of the encoder and/or decoder MoE layers -> host RoutingStats over all L layers."""
  return _routing_stats_of(cfg, _to_host((enc, dec)))


def _routing_stats_of(cfg: SwitchConfig, parts) -> RoutingStats:
  """Host (encoder, decoder) LayerStats (numpy; either None) -> RoutingStats over all L layers."""
  num_enc = len(cfg.encoder_sparse_layers)
  e = cfg.num_experts
  imp = np.zeros((cfg.num_moe_layers, e))
  wanted = np.zeros((cfg.num_moe_layers, e), np.int64)
  served = np.zeros((cfg.num_moe_layers, e), np.int64)
  redirected = np.zeros((cfg.num_moe_layers,), np.int64)
  from_bank = np.zeros((cfg.num_moe_layers,), np.int64)
  missed = np.zeros((cfg.num_moe_layers,), np.int64)
  for part, lo in zip(parts, (0, num_enc)):
    if part is None:
      continue
    n = part.importance.shape[0]
    imp[lo:lo + n] = part.importance
    wanted[lo:lo + n] = part.wanted
    served[lo:lo + n] = part.served
    redirected[lo:lo + n] = part.redirected
    from_bank[lo:lo + n] = part.from_bank
    missed[lo:lo + n] = part.missed_experts
  return RoutingStats(imp, wanted, served, redirected, from_bank, missed)


class Residency:
  """A policy at work: controller (which experts), executor (bytes), telemetry (what happened).

  Statistics are summed on the device (inside `decode_steps`) and read by the host once per window of
  `update_every` steps, `READ_LAG_CALLS` calls late, so that the read never waits on the call just dispatched and
  the host never synchronises per step. Writes (at most `max_swaps_per_step` per call) are issued after
  every call while the controller has moves left.
  """

  def __init__(self, cfg: SwitchConfig, controller: SwapController, executor: SwapExecutor | None,
               telemetry: Telemetry, update_every: int = 16, swap_between_requests: bool = True,
               prefill_refit: float | None = None, prompt_residency: bool = False):
    self.cfg = cfg
    self.controller = controller
    self.executor = executor
    self.telemetry = telemetry
    self.update_every = max(1, int(update_every))
    self.swap_between_requests = bool(swap_between_requests)
    self.prefill_refit = check_prefill_refit(controller.policy, prefill_refit, executor is not None)
    self.prompt_residency = check_prompt_residency(controller.policy, prompt_residency)
    self._prompt = None if not self.prompt_residency else PromptPredictor(cfg.num_moe_layers, cfg.num_experts,
                                                                         cfg.vocab_size)
    self._prompt_tokens = None  # this request's prompt token ids (prompt residency learns from them)
    self.prompt_pins = 0  # requests whose residents were moved to their prompt's prediction
    self.prompt_batches_skipped = 0  # requests of several prompts, which prompt residency leaves alone
    self.refits = 0  # requests whose encoder was refitted and run again
    self.refit_matches = 0  # refits whose decoder layers followed a past request (`refit_to_prefill`)
    # Past requests' routing for prefill-informed residency: (encoder signature, decoder importance).
    self._library: list[tuple[np.ndarray, np.ndarray]] = []
    self._request = RoutingStats.zeros(cfg.num_moe_layers, cfg.num_experts)  # this request's, so far
    self._open = []  # StatsRead of each (enc, dec) device statistics entry of the open window
    self._closed = []  # (call at which it closed, statistics) of windows not yet read
    self._calls = 0  # decode calls so far
    self._steps = 0
    self._swap = dict(experts_swapped=0, bytes_swapped=0, transfer_s=0.0)  # since the last record
    self._may_write = True  # False once the controller has no moves left, until the next observation
    self._pin_executor = None  # `pin`'s executor where the policy has none (a static policy)
    self.totals = RoutingStats.zeros(cfg.num_moe_layers, cfg.num_experts)  # merged over all calls
    telemetry.set_resident(controller.state.slot_expert)

  def after_prefill(self, slots, enc_stats, dec_stats=None, issue: bool = True):
    """After an encoder (or full forward) call: its statistics join the open window, and the
    controller's next swaps are issued unless `issue` is False (`generate`: they would queue before the
    first decode call and delay the first token by their copies; the first call's `after_step` issues
    them, once that token is out)."""
    self._open.append(StatsRead((enc_stats, dec_stats)))
    slots = self._observe(slots)
    return self._issue_writes(slots) if issue else slots

  def after_step(self, slots, stats_sum, steps: int = 1):
    """After dispatching a decode call of `steps` steps whose output accumulator is `stats_sum`.

    A window closes at the first call that brings it to `update_every` steps or more.
    Returns (slots for the next call, accumulator for the next call — None when this call closed a
    window and handed the accumulator over: start a fresh one)."""
    self._calls += 1
    slots = self._observe(slots)  # windows closed READ_LAG_CALLS calls ago or more
    self._steps += steps
    if self._steps >= self.update_every:
      self._steps = 0
      self._closed.append((self._calls, self._open + [StatsRead((None, stats_sum))]))
      self._open, stats_sum = [], None
    return self._issue_writes(slots), stats_sum

  def flush(self, slots, stats_sum=None):
    """End of a request: reads everything outstanding (this waits for the device); returns slots.

    With `swap_between_requests`, the controller's remaining moves are then issued too, in commits of
    `max_swaps_per_step` (the staging slots), until it has none: between requests no step waits on
    them, and the next request starts on the set that this one's routing asked for, instead of
    approaching it a few experts per device call while it runs (a request of a few tokens has few calls).
    The copies queue on the device ahead of the next request's first call."""
    self._closed.append((self._calls, self._open + ([StatsRead((None, stats_sum))] if stats_sum is not None else [])))
    self._open = []
    self._steps = 0
    slots = self._observe(slots, everything=True)
    if self._prompt is not None:
      if self._prompt_tokens is not None:
        self._prompt.learn(self._prompt_tokens, self._request.importance)
      self._prompt_tokens = None
    if self.prefill_refit is not None:
      self._remember_request()
    self._request = RoutingStats.zeros(self.cfg.num_moe_layers, self.cfg.num_experts)
    if not self.swap_between_requests or self.executor is None:
      return slots
    for _ in range(self.cfg.num_experts * self.controller.num_layers):  # a bound: a commit moves >= 1
      before = self._swap["experts_swapped"]
      slots = self._issue_writes(slots)
      if self._swap["experts_swapped"] == before:
        break
    return slots

  def _observe(self, slots, everything: bool = False):
    """Reads the closed windows that are old enough (all of them with `everything`) and lets the
    controller learn from them, merged."""
    ready = [w for c, w in self._closed if everything or self._calls - c >= READ_LAG_CALLS]
    self._closed = [(c, w) for c, w in self._closed if not (everything or self._calls - c >= READ_LAG_CALLS)]
    if not any(ready):
      return slots
    t0 = time.perf_counter()
    stats = RoutingStats.zeros(self.cfg.num_moe_layers, self.cfg.num_experts)
    for read in (entry for window in ready for entry in window):
      stats = stats.merge(_routing_stats_of(self.cfg, read.get()))
    wait_s = time.perf_counter() - t0
    self.totals = self.totals.merge(stats)
    if self.prefill_refit is not None or self._prompt is not None:  # they learn from each request's routing
      self._request = self._request.merge(stats)
    hits, misses = self.controller.observe(stats)
    self._may_write = True
    self.telemetry.add(StepRecord.from_stats(self.telemetry.steps, stats, hits=hits, misses=misses,
                                             wait_s=wait_s, **self._swap))
    self._swap = dict(experts_swapped=0, bytes_swapped=0, transfer_s=0.0)
    return slots

  def _issue_writes(self, slots):
    if self.executor is None or not self._may_write:
      return slots
    writes = self.controller.next_writes()
    if not writes:
      self._may_write = bool(self.controller.pending)
      return slots
    planned = [self.controller.planned_slots(l) for l in range(self.controller.num_layers)]
    maps = [_index_map(p, self.cfg.num_experts) for p in planned]
    slots, transfer_s = self.executor.apply(slots, writes, maps)
    # Device programs run in issue order: every later call sees these slots, so the writes landed.
    self.controller.commit(writes)
    self.telemetry.set_resident(self.controller.state.slot_expert)
    self._swap["experts_swapped"] += len(writes)
    self._swap["bytes_swapped"] += len(writes) * self.executor.store.expert_bytes
    self._swap["transfer_s"] += transfer_s
    return slots

  def before_request(self, slots, input_ids, attention_mask=None):
    """Prompt residency, before a request's first device call: moves the resident sets to the experts
    that past requests sharing this prompt's tokens wanted (`PromptPredictor`), so that a request
    after a change of task does not run its whole prefill on the previous task's experts. Nothing is
    read from the device, and nothing moves while writes are in flight. A request of several prompts
    (a batch of rows) is left alone, and its end teaches the predictor nothing (`prompt_batches_skipped`
    counts them). Returns the slots."""
    if self._prompt is None:
      return slots
    ids = np.asarray(input_ids)
    if ids.ndim > 1 and ids.shape[0] > 1:
      # A batch of several prompts neither predicts nor learns: its routing statistics are summed over
      # its rows, so each prompt's tokens would learn the other rows' experts, and a prediction for the
      # mix pins towards the mean of past requests. On an H200 at batch 8 (random prompts) the pins and
      # the predictor's host work cost 14 % per request once most tokens were known (RESULTS.md,
      # session 40); every accuracy figure of prompt residency is of requests of one prompt.
      self._prompt_tokens = None
      self.prompt_batches_skipped += 1
      return slots
    self._prompt_tokens = ids[np.asarray(attention_mask, bool)] if attention_mask is not None else ids.ravel()
    if self.controller.pending:
      return slots
    predicted = self._prompt.predict(self._prompt_tokens)
    if predicted is None:
      return slots
    # every layer ranked in one call (`_ranked` ranks one)
    order = rank_by_score(predicted, self.controller.state.resident_mask(), self.controller.hysteresis)
    targets = [order[l, :k] for l, k in enumerate(self.controller.state.slots_per_layer)]
    before = self._swap["experts_swapped"]
    slots = self._pin_checked(slots, targets)  # `rank_by_score` gives K_l distinct ids per layer
    if self._swap["experts_swapped"] > before:
      self.prompt_pins += 1
      self.controller.hold_resident(predicted)  # its old targets and scores would move them straight back
    return slots

  LIBRARY_SIZE = 64  # past requests remembered for prefill-informed residency
  MATCH_SIMILARITY = 0.5  # the least cosine similarity of encoder signatures that counts as a match

  def _layers(self, stack: str) -> list[int]:
    return [i for i, (s, _) in enumerate(self.cfg.moe_layers) if s == stack]

  def _signature(self, stats: RoutingStats) -> np.ndarray:
    """A request's encoder routing as a unit vector: its tokens' wanted experts per encoder layer."""
    v = stats.wanted[self._layers("encoder")].astype(np.float64).ravel()
    n = np.linalg.norm(v)
    return v / n if n else v

  def _remember_request(self) -> None:
    """At a request's end: its encoder signature and its decoder layers' importance join the library."""
    req = self._request
    dec = self._layers("decoder")
    if req.wanted[dec].sum() and req.wanted[self._layers("encoder")].sum():
      self._library = (self._library + [(self._signature(req), req.importance[dec].copy())])[-self.LIBRARY_SIZE:]

  def _ranked(self, layer: int, score: np.ndarray, resident: np.ndarray) -> np.ndarray:
    """The K_l experts of highest score (`swap.rank_by_score`, with the controller's hysteresis)."""
    order = rank_by_score(score, resident, self.controller.hysteresis)
    return order[:self.controller.state.slots_per_layer[layer]]

  def refit_to_prefill(self, slots, enc_stats):
    """Prefill-informed residency (encoder-decoder models): after a request's encoder call, when more
    than `prefill_refit` of its encoder tokens were redirected, refits the resident sets to this request
    before it decodes, so that the caller runs the encoder again on them. Waits for the encoder call
    (it reads its statistics).

    Encoder layers: the K_l experts this request's own (unmasked) routing gave the most importance (Eq.
    1). Decoder layers, which have not run yet: the experts that mattered most to the decoder of the past
    request whose encoder routing is most similar (cosine of the wanted-expert counts, at least
    `MATCH_SIMILARITY`, among the last `LIBRARY_SIZE` requests; MoE-Infinity's request-level activation
    matching), else they keep theirs. Residents count (1 + the controller's hysteresis) times, ties go
    to them. The copies go through `pin` (the controller's state and telemetry follow; its scores learn
    from the second encoder call as usual). Returns (slots, whether anything moved); nothing moves
    while the controller has writes in flight.
    """
    if self.prefill_refit is None or self.controller.pending:
      return slots, False
    stats = routing_stats(self.cfg, enc_stats, None)
    enc, dec = self._layers("encoder"), self._layers("decoder")
    wanted = int(stats.wanted[enc].sum())
    if not wanted or stats.redirected[enc].sum() <= self.prefill_refit * wanted:
      return slots, False
    resident = self.controller.state.resident_mask()
    targets = [np.asarray(self.controller.state.resident(l), np.int64) for l in range(self.controller.num_layers)]
    for l in enc:
      targets[l] = self._ranked(l, stats.importance[l], resident[l])
    if self._library and dec:
      sig = self._signature(stats)
      sims = np.array([sig @ past for past, _ in self._library])
      best = int(np.argmax(sims))
      if sims[best] >= self.MATCH_SIMILARITY:
        self.refit_matches += 1
        for row, l in enumerate(dec):
          targets[l] = self._ranked(l, self._library[best][1][row], resident[l])
    before = self._swap["experts_swapped"]
    slots = self.pin(slots, targets)
    moved = self._swap["experts_swapped"] > before
    self.refits += int(moved)
    return slots, moved

  def pin(self, slots, resident, store=None, max_writes: int = 1):
    """Makes `resident` the resident experts, between requests; returns the new slot state (a `Flat`).

    resident: per MoE layer, the K_l distinct expert ids in [0, E) to hold (in any order).
    store, max_writes: the host expert store and the writes per commit (the plan's staging slots) of
      the executor made for a policy that has none (`full`, `pruned`); unused otherwise. Experts
    already resident keep their slots; each other one replaces an expert not in the new set. The
    writes go through a `SwapExecutor` in commits of its `max_writes` (the planner's staging slots),
    each with its layer's index map, as the controller's own swaps do; the controller's state and the
    telemetry's resident set follow, and the copies count as swapped experts. Only values change, so
    no decode program recompiles (a static policy, which has no executor, compiles the one-slot
    write program on its first pin). A dynamic controller keeps its scores and may move away from
    the pinned set at its next observation. Raises ResidencyError (a ValueError) on a bad `resident`
    or while the controller has writes in flight.
    """
    targets = self._check_pin(resident)
    if self.controller.pending:
      raise ResidencyError(f"{len(self.controller.pending)} slot writes are in flight: pin between requests")
    return self._pin_checked(slots, targets, store, max_writes)

  def _pin_checked(self, slots, targets, store=None, max_writes: int = 1):
    """`pin` for targets known to be valid (K_l distinct ids in range per layer) with no writes in
    flight: `before_request` calls it on every request, on the host before the encode, while the device
    waits (as Python sets: `e not in target` on a numpy array cost ~1 ms a request at 64 experts)."""
    writes = []
    for layer, target in enumerate(targets):
      held = self.controller.state.slot_expert[layer].tolist()
      want = set(target.tolist())
      incoming = sorted(want.difference(held))
      if not incoming:
        continue
      free = [s for s, e in enumerate(held) if e not in want]  # empty slots (-1) included
      writes += [SlotWrite(layer, s, e, held[s]) for s, e in zip(free, incoming)]
    if not writes:
      return slots
    executor = self.executor or self._pin_executor or self._make_pin_executor(store, max_writes)
    for start in range(0, len(writes), executor.max_writes):
      part = writes[start:start + executor.max_writes]
      self.controller.state.apply(part)  # validates the writes before any byte moves
      slots, transfer_s = executor.apply(slots, part, self.controller.state.index_maps())
      self._swap["experts_swapped"] += len(part)
      self._swap["bytes_swapped"] += len(part) * executor.store.expert_bytes
      self._swap["transfer_s"] += transfer_s
    self.telemetry.set_resident(self.controller.state.slot_expert)
    self._may_write = True  # a dynamic controller may now want to move again
    return slots

  def _check_pin(self, resident) -> list[np.ndarray]:
    """`resident` as int arrays per layer; ResidencyError unless L layers of K_l distinct ids in [0, E)."""
    k_l, e = self.controller.state.slots_per_layer, self.cfg.num_experts
    if isinstance(resident, (str, bytes)) or not hasattr(resident, "__len__") or len(resident) != len(k_l):
      got = len(resident) if hasattr(resident, "__len__") else type(resident).__name__
      raise ResidencyError(f"resident must give one set of expert ids per MoE layer ({len(k_l)}), got {got}")
    out = []
    for layer, (ids, k) in enumerate(zip(resident, k_l)):
      a = np.asarray(ids)
      if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or a.size == 0) or a.ndim != 1:
        raise ResidencyError(f"layer {layer}: resident experts must be a 1-D array of integer ids, "
                             f"got {a.dtype} of shape {a.shape}")
      a = a.astype(np.int64)
      if a.size != k:
        raise ResidencyError(f"layer {layer}: {a.size} experts given for {k} slots (give exactly {k})")
      if a.size and (a.min() < 0 or a.max() >= e):
        raise ResidencyError(f"layer {layer}: expert ids must be in [0, {e}), got {sorted(a.tolist())}")
      if len(np.unique(a)) != a.size:
        raise ResidencyError(f"layer {layer}: expert ids repeat in {a.tolist()}")
      out.append(a)
    return out

  def _make_pin_executor(self, store, max_writes: int) -> SwapExecutor:
    """An executor for a policy that has none, committing `max_writes` experts at a time."""
    from swapmoe_jax.serving import sharding

    if store is None:
      raise ResidencyError(f"policy {self.controller.policy!r} has no swap executor: pin needs the expert store")
    args = (store, self.cfg.moe_layers, self.controller.state.slots_per_layer, max(1, int(max_writes)))
    if isinstance(store, sharding.ShardedExpertStore):
      self._pin_executor = sharding.ShardedSwapExecutor(*args, store.mesh)
    else:
      self._pin_executor = SwapExecutor(*args)
    return self._pin_executor


def check_prompt_residency(policy: str, value) -> bool:
  """`load(prompt_residency=)`: a bool, for the policies that swap by importance."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"prompt_residency must be True or False, got {value!r:.40}")
  if value and policy not in IMPORTANCE_POLICIES:
    raise ValueError(f"prompt_residency applies to policies swapmoe, selective and fallback, not {policy!r}")
  return bool(value)


class PromptPredictor:
  """Which experts a request will want, predicted from its prompt's tokens before anything runs.

  After each request, every distinct token of its prompt (hashed into `BUCKETS`) moves its running
  mean of the request's per-layer importance shares (Eq. 1, each layer normalised to sum 1) towards
  this request's. A new prompt's prediction is the mean over its known tokens of those rows, each
  weighted by its inverse document frequency, so that tokens common to every task (punctuation, the
  shared vocabulary) count little and the tokens that mark a task count most. A bag-of-tokens version
  of the learned expert predictors of SiDA-MoE and Pre-gated MoE, learned online from the routing the
  serving loop already reads. Returns None (no prediction) unless at least `MIN_KNOWN` of a prompt's
  distinct tokens were seen before: a prediction from a few known tokens of a prompt otherwise new is
  noise, and acting on it moves experts on the first token's path for nothing (on one H200, random-token
  prompts each re-pinned ~12 experts: time to first token 13 ms against 4.3). A token is known when it
  was itself in a learned prompt (`vocab_size` given: a bit per token id), not when another token of its
  bucket was: with a vocabulary larger than `BUCKETS` every bucket is soon seen, and random prompts of
  switch-base's 32k tokens were all "known" after some 70 requests, predicted the mean of past requests
  and moved ~2 experts each (RESULTS.md, session 39). Only known tokens' rows enter a prediction.

  Host memory: one float32 [L, E] row per bucket, all `BUCKETS` of them allocated and written when the
  policy is made (12.6 MB for switch-base-64's 12 MoE layers of 64 experts, 50 MB for
  switch-large-128's 24 of 128), so that a server's memory does not grow while prompts fill them in
  (made on first sight, they were 12.6 MB of a GPU soak's 43 MiB RSS rise over its first 10k steps;
  `benchmarks/soak.py`).
  """

  BUCKETS = 4096
  MEMORY = 32  # requests a token's row averages over (a running mean, then exponential)
  MIN_KNOWN = 0.5  # the least fraction of a prompt's distinct tokens seen before that predicts

  def __init__(self, num_layers: int, num_experts: int, vocab_size: int | None = None):
    self.shares = np.empty((self.BUCKETS, num_layers, num_experts), np.float32)  # a bucket's running mean
    self.shares.fill(0.0)  # written now, so its pages are resident from the start (np.zeros maps them lazily)
    self.seen = np.zeros(self.BUCKETS, np.int64)  # requests whose prompt had the token
    self.requests = 0
    # token ids seen in a learned prompt (None: a token is known when its bucket is); allocated now, too
    self.token_seen = None if vocab_size is None else np.ones(int(vocab_size), bool)
    if self.token_seen is not None:
      self.token_seen.fill(False)

  def _buckets(self, tokens) -> np.ndarray:
    return np.unique(np.asarray(tokens, np.int64).ravel() % self.BUCKETS)

  def learn(self, tokens, importance: np.ndarray) -> None:
    """A finished request: its prompt tokens and its importance [L, E] (summed over its calls)."""
    imp = np.asarray(importance, np.float64)
    total = imp.sum(axis=1, keepdims=True)
    if not np.any(total > 0):
      return
    share = np.where(total > 0, imp / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)
    b = self._buckets(tokens)
    if not b.size:
      return
    if self.token_seen is not None:
      ids = np.asarray(tokens, np.int64).ravel()
      self.token_seen[ids[(ids >= 0) & (ids < self.token_seen.size)]] = True
    self.seen[b] += 1
    # rows <- rows + (share - rows) / n, on one gathered copy of the rows written back once: at batch 8
    # (~900 distinct buckets) the fancy-indexed `+=` gathered them twice, on the path between two requests
    n = np.minimum(self.seen[b], self.MEMORY).astype(np.float32)[:, None]
    flat = self.shares.reshape(self.BUCKETS, -1)
    rows = np.take(flat, b, axis=0)
    step = share.reshape(1, -1) - rows
    step /= n
    rows += step
    flat[b] = rows
    self.requests += 1

  def predict(self, tokens) -> np.ndarray | None:
    """float [L, E] predicted importance shares for a prompt, or None when under `MIN_KNOWN` of its
    distinct tokens are known."""
    if self.token_seen is None:
      b = self._buckets(tokens)
      known = b[self.seen[b] > 0]
      n_known, distinct = known.size, b.size
    else:
      ids = np.unique(np.asarray(tokens, np.int64).ravel())
      ids_in = ids[(ids >= 0) & (ids < self.token_seen.size)]
      seen_ids = ids_in[self.token_seen[ids_in]]
      known, n_known, distinct = self._buckets(seen_ids), seen_ids.size, ids.size
    if not n_known or n_known < self.MIN_KNOWN * distinct:
      return None
    b = known
    idf = np.log((1.0 + self.requests) / self.seen[b])  # near 0 for a token in every request
    if not np.any(idf > 0):
      return None
    # float32 weights: a float64 tensordot first converted the gathered rows to float64, host time before
    # the encode (at batch 8, ~900 rows of L x E; with `learn`'s one gather, `swapmoe` went from 1.155x to
    # 1.078x `full` per request on an H200: RESULTS.md, session 40)
    rows = np.take(self.shares.reshape(self.BUCKETS, -1), b, axis=0)
    return (idf.astype(np.float32) @ rows).reshape(self.shares.shape[1:]).astype(np.float64) / idf.sum()


def _index_map(slot_expert: np.ndarray, num_experts: int) -> np.ndarray:
  out = np.full((num_experts,), -1, np.int32)
  for s, e in enumerate(slot_expert):
    if e >= 0:
      out[e] = s
  return out
