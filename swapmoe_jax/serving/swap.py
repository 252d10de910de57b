"""Swap controllers: which expert sits in which slot, and which slot writes to make next.

Pure bookkeeping, separate from the code that copies bytes (mixtral-offloading keeps the two apart
too). The host loop, per device call:
  hits, misses = controller.observe(stats)  # RoutingStats of the call that just ran
  writes = controller.next_writes()         # start the host->device copies of these experts
  ...                                       # once they have landed in their slots:
  controller.commit(writes)                 # then pass controller.state.index_map(l) to the step
Until committed, writes are `pending`: their slots are not re-planned and their experts do not count as
resident for hits. Pending writes may be committed in any order, together or one by one.
`max_swaps_per_step` bounds the writes in flight, which is what the planner's staging buffers hold, so
`next_writes` returns at most `max_swaps_per_step - len(pending)` writes.

Policies:
  swapmoe  SwapMoE (masked routing): decayed Eq. 1 importance; every `update_every` calls the target
           becomes the top-K_l experts per layer, approached a few writes per step.
  selective  as swapmoe, for selective routing (probable misses read from the host bank, the others
           redirected); importance is of the unmasked router either way, so the swaps are the same.
  fallback as swapmoe, for fallback routing (misses computed from int8 copies on the device): the
           resident set that serves the most importance also serves the fewest tokens in low precision.
  lru      exact routing, mixtral-offloading style: keep the K_l most recently wanted experts.
  lfu      exact routing: keep the K_l experts wanted in the most recent steps, by decayed frequency.
  full / pruned  static: never write (pruned: top-K_l by expert norm, the paper's Pruning baseline).

Axis letters: L MoE layers, E experts, K slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from swapmoe_jax.serving.planner import DEFAULT_MAX_SWAPS_PER_STEP, DEFAULT_UPDATE_EVERY
from swapmoe_jax.serving.stats import RoutingStats

# Per observed call of a layer; 1 / (1 - decay) calls is the effective window (2 for swapmoe). An encoder
# layer is observed once per request, so 0.95 remembered ~20 requests: after a change of task the resident
# set lagged by a dozen requests. Measured on the built-in model (runs stream, 200 requests, swaps drained
# at request ends): exact match 96.5% at 5/16 and 92.5% at 3/16 with 0.5, 96.0% / 86.0% with 0.95
# (README, Accuracy against budget, has the ablation and its command).
DEFAULT_DECAY = 0.5
# Hysteresis of the importance controllers as `load` builds them (`make_controller`): a resident expert's
# score counts (1 + hysteresis) times when the targets are chosen, and an incoming expert must beat its
# victim's score by that factor (0, the controller class's own default: any higher score swaps, the
# paper's top-K). Measured on the built-in model (runs stream, 300 requests, paired against 0): 0.5 made
# 30 % fewer swaps at 3/16 and 18 % fewer at 5/16 with exact match +1.0 [-1.3, +3.7] and -0.3 [-1.0, +0.0]
# points; on an H200 (switch-base-64 at 33 %, random prompts) 38 % fewer swaps and 3 % less time per
# request. README, Accuracy against budget, has the ablation and its command.
DEFAULT_HYSTERESIS = 0.5
DEFAULT_LFU_DECAY = 0.9
POLICIES = ("swapmoe", "selective", "fallback", "lru", "lfu", "full", "pruned")
# The policies whose controller ranks experts by decayed Eq. 1 importance (`ImportanceSwapController`).
IMPORTANCE_POLICIES = ("swapmoe", "selective", "fallback")
# What a call adds to an importance policy's scores (`ImportanceSwapController`'s `term`): the paper's
# Eq. 1, token counts, or Eq. 1 without the expert's norm.
IMPORTANCE_TERMS = ("eq1", "counts", "routed")


def rank_by_score(scores: np.ndarray, resident: np.ndarray, hysteresis: float = 0.0) -> np.ndarray:
  """Expert ids by falling score along the last axis ([..., E]), a resident expert's score counting
  (1 + hysteresis) times; ties prefer residents (no churn on equal scores), then lower ids. The top-K of
  a layer are the first K."""
  if hysteresis:
    scores = scores * np.where(resident, 1.0 + hysteresis, 1.0)
  ids = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
  return np.lexsort((ids, ~resident, -scores), axis=-1)  # last key is primary


class ResidencyError(ValueError):
  """A slot write or resident set that breaks the residency invariants."""


@dataclasses.dataclass(frozen=True)
class SlotWrite:
  """Copy `expert` into `slot` of MoE layer `layer`, replacing `evicted` (-1: the slot was empty)."""

  layer: int
  slot: int
  expert: int
  evicted: int


class ResidencyState:
  """Which expert each slot holds, per MoE layer.

  Invariant: in each layer, an expert occupies at most one slot; -1 marks an empty slot.

  Attributes:
    slot_expert: per layer, read-only int32[K_l]: the expert in each slot, -1 if empty.
  """

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None = None):
    if num_experts < 1:
      raise ResidencyError(f"num_experts must be >= 1, got {num_experts}")
    self.num_experts = int(num_experts)
    self.slots_per_layer = tuple(int(k) for k in slots_per_layer)
    if any(not 1 <= k <= num_experts for k in self.slots_per_layer):
      raise ResidencyError(f"every K_l must be in [1, {num_experts}], got {self.slots_per_layer}")
    if initial_resident is None:
      initial_resident = [()] * len(self.slots_per_layer)
    if len(initial_resident) != len(self.slots_per_layer):
      raise ResidencyError(f"initial_resident has {len(initial_resident)} layers, expected "
                           f"{len(self.slots_per_layer)}")
    slot_expert = []
    for layer, (k, experts) in enumerate(zip(self.slots_per_layer, initial_resident)):
      experts = [int(e) for e in experts]
      if len(experts) > k:
        raise ResidencyError(f"layer {layer}: {len(experts)} initial experts for {k} slots")
      slots = np.full(k, -1, np.int32)
      slots[:len(experts)] = experts
      slot_expert.append(slots)
    self._slot_of = np.full((len(slot_expert), self.num_experts), -1, np.int32)
    self._set(slot_expert, range(len(slot_expert)))
    self.check()

  def _set(self, slot_expert: list[np.ndarray], changed: Iterable[int]) -> None:
    """Installs new slot contents and updates the derived [L,E] index map; all read-only."""
    index = self._slot_of.copy()
    for layer in changed:
      slots = slot_expert[layer]
      slots.flags.writeable = False
      filled = np.flatnonzero(slots >= 0)
      index[layer] = -1
      index[layer, slots[filled]] = filled
    mask = index >= 0
    empty = np.asarray(self.slots_per_layer) - mask.sum(axis=1)
    for a in (index, mask, empty):
      a.flags.writeable = False
    self.slot_expert, self._slot_of, self._mask, self._empty = slot_expert, index, mask, empty

  @property
  def num_layers(self) -> int:
    return len(self.slots_per_layer)

  def index_map(self, layer: int) -> np.ndarray:
    """int32[E]: the slot holding each expert of `layer`, -1 if not resident."""
    return self._slot_of[layer].copy()

  def index_maps(self) -> list[np.ndarray]:
    return [self.index_map(layer) for layer in range(self.num_layers)]

  def slot_of(self) -> np.ndarray:
    """Read-only int32[L,E]: every layer's index map."""
    return self._slot_of

  def resident_mask(self) -> np.ndarray:
    """Read-only bool[L,E]: True where the expert is resident."""
    return self._mask

  def empty_slots(self) -> np.ndarray:
    """Read-only int[L]: empty slots per layer."""
    return self._empty

  def resident(self, layer: int) -> list[int]:
    """The resident experts of `layer`, ascending."""
    return np.flatnonzero(self._mask[layer]).tolist()

  def check(self) -> None:
    """Raises ResidencyError unless every slot holds -1 or a distinct expert in [0, E)."""
    for layer, slots in enumerate(self.slot_expert):
      if slots.shape != (self.slots_per_layer[layer],) or slots.dtype != np.int32:
        raise ResidencyError(f"layer {layer}: slot_expert must be int32[{self.slots_per_layer[layer]}]")
      if np.any((slots < -1) | (slots >= self.num_experts)):
        raise ResidencyError(f"layer {layer}: expert ids out of range in {slots.tolist()}")
      filled = slots[slots >= 0]
      if len(np.unique(filled)) != len(filled):
        raise ResidencyError(f"layer {layer}: an expert occupies two slots: {slots.tolist()}")
      if not np.array_equal(self._slot_of[layer, filled], np.flatnonzero(slots >= 0)):
        raise ResidencyError(f"layer {layer}: index map out of date")
    if int(self._mask.sum()) != sum(int(np.sum(s >= 0)) for s in self.slot_expert):
      raise ResidencyError("index map out of date")

  def apply(self, writes: Iterable[SlotWrite]) -> None:
    """Applies writes in order, atomically: on a ResidencyError nothing changes.

    Each write's `evicted` must be what its slot holds at that point (catches stale writes).
    """
    new = list(self.slot_expert)
    copied = set()
    for w in writes:
      if not 0 <= w.layer < self.num_layers:
        raise ResidencyError(f"{w}: layer out of range [0, {self.num_layers})")
      if w.layer not in copied:
        new[w.layer] = new[w.layer].copy()
        copied.add(w.layer)
      slots = new[w.layer]
      if not 0 <= w.slot < len(slots):
        raise ResidencyError(f"{w}: slot out of range [0, {len(slots)})")
      if not 0 <= w.expert < self.num_experts:
        raise ResidencyError(f"{w}: expert out of range [0, {self.num_experts})")
      if slots[w.slot] != w.evicted:
        raise ResidencyError(f"{w}: slot {w.slot} holds expert {slots[w.slot]}, not {w.evicted}")
      if np.any(slots == w.expert):
        raise ResidencyError(f"{w}: expert {w.expert} is already resident in layer {w.layer}")
      slots[w.slot] = w.expert
    if copied:
      self._set(new, copied)


class SwapController:
  """Shared interface and bookkeeping: observe(stats), next_writes(), commit(writes), state.

  Subclasses override `_observe` (learn from a call) and `_plan` (choose up to `room` writes).
  """

  policy = ""

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None,
               max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP):
    if max_swaps_per_step < 0:
      raise ValueError(f"max_swaps_per_step must be >= 0, got {max_swaps_per_step}")
    self.state = ResidencyState(num_experts, slots_per_layer, initial_resident)
    self.max_swaps_per_step = int(max_swaps_per_step)
    self._pending: list[SlotWrite] = []
    self.observations = 0
    self.swaps_planned = 0
    self.swaps_committed = 0
    self.swaps_cancelled = 0

  @property
  def num_layers(self) -> int:
    return self.state.num_layers

  @property
  def num_experts(self) -> int:
    return self.state.num_experts

  @property
  def pending(self) -> tuple[SlotWrite, ...]:
    """Writes handed out by `next_writes` and not yet committed or cancelled."""
    return tuple(self._pending)

  def observe(self, stats: RoutingStats) -> tuple[int, int]:
    """Learns from one device call; returns (hits, misses): wanted (layer, expert) pairs, by residency."""
    if stats.importance.shape != (self.num_layers, self.num_experts):
      raise ValueError(f"stats are {stats.importance.shape}; this controller has "
                       f"[L={self.num_layers}, E={self.num_experts}]")
    used = stats.used()
    resident = self.state.resident_mask()
    hits, misses = int(np.sum(used & resident)), int(np.sum(used & ~resident))
    self.observations += 1
    self._observe(stats)
    return hits, misses

  def next_writes(self) -> list[SlotWrite]:
    """Up to `max_swaps_per_step - len(pending)` new writes; they become pending."""
    room = self.max_swaps_per_step - len(self._pending)
    writes = self._plan(room) if room > 0 else []
    self._pending.extend(writes)
    self.swaps_planned += len(writes)
    return writes

  def commit(self, writes: Iterable[SlotWrite]) -> None:
    """Marks pending writes as landed: the slots now hold the new experts."""
    writes = self._take_pending(writes)
    self.state.apply(writes)
    self._pending = [w for w in self._pending if w not in writes]
    self.swaps_committed += len(writes)

  def cancel(self, writes: Iterable[SlotWrite]) -> None:
    """Drops pending writes whose copies were abandoned; the slots keep their old experts."""
    writes = self._take_pending(writes)
    self._pending = [w for w in self._pending if w not in writes]
    self.swaps_cancelled += len(writes)

  def _take_pending(self, writes: Iterable[SlotWrite]) -> list[SlotWrite]:
    writes = list(writes)
    for w in writes:
      if w not in self._pending:
        raise ResidencyError(f"{w} is not pending")
    if len(set(writes)) != len(writes):
      raise ResidencyError("the same write was given twice")
    return writes

  def planned_slots(self, layer: int) -> np.ndarray:
    """int32[K_l]: slot contents once the pending writes land."""
    slots = self.state.slot_expert[layer].copy()
    for w in self._pending:
      if w.layer == layer:
        slots[w.slot] = w.expert
    return slots

  def _busy_slots(self, layer: int) -> set[int]:
    return {w.slot for w in self._pending if w.layer == layer}

  def _observe(self, stats: RoutingStats) -> None:
    pass

  def _plan(self, room: int) -> list[SlotWrite]:
    return []

  def hold_resident(self, shares=None) -> None:
    """After a resident set was chosen from outside (`Residency.before_request`): the current residents
    become the controller's targets until its next target update; `shares` (float [L, E], each layer
    summing to 1), the importance that chose them, replaces the shape of an importance controller's
    scores (their per-layer totals kept), so that its next updates start from the same belief instead of
    moving the experts back. No-op for controllers without targets."""


class StaticController(SwapController):
  """Policies 'full' and 'pruned': the resident set never changes."""

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None, policy: str = "pruned"):
    if policy not in ("full", "pruned"):
      raise ValueError(f"StaticController policy must be 'full' or 'pruned', got {policy!r}")
    super().__init__(num_experts, slots_per_layer, initial_resident, max_swaps_per_step=0)
    self.policy = policy


def pruned_resident(expert_norms: np.ndarray, slots_per_layer: Sequence[int]) -> list[np.ndarray]:
  """The paper's Pruning baseline: per layer, the K_l experts with the largest norm.

  Args:
    expert_norms: float[L,E], ||E_i|| per expert.
    slots_per_layer: K_l per layer.
  Returns:
    Per layer int32[K_l], by descending norm (ties: lower expert id first).
  """
  norms = np.asarray(expert_norms, dtype=np.float64)
  if norms.ndim != 2 or norms.shape[0] != len(slots_per_layer):
    raise ValueError(f"expert_norms must be [L={len(slots_per_layer)}, E], got shape {norms.shape}")
  return [np.argsort(-row, kind="stable")[:k].astype(np.int32) for row, k in zip(norms, slots_per_layer)]


class _RankedController(SwapController):
  """A controller that keeps, per layer, the top-K_l experts by a score.

  The target of layer l is the top-K_l of `scores[l]`; ties prefer experts that are (or are about to
  be) resident, so equal scores never cause churn, then lower expert ids. `_plan` pairs the missing
  target experts (highest score first, then lowest id) with free slots: empty ones first, then those
  holding a non-target expert, lowest score first (then lowest id). Pairs come out with falling gains;
  a pair is a write only if the incoming score beats the evicted one (an empty slot scores
  `_EMPTY_SCORE`). Writes from all layers are taken by `_priorities`, best first.
  Vectorised over [L,E]: the host loop runs this between device steps of about a millisecond.
  """

  _EMPTY_SCORE = -np.inf
  _RETARGET_ON_PLAN = True
  hysteresis = 0.0  # >= 0: residents' advantage, see `ImportanceSwapController`

  def __init__(self, num_experts, slots_per_layer, initial_resident, max_swaps_per_step):
    super().__init__(num_experts, slots_per_layer, initial_resident, max_swaps_per_step)
    self.scores = np.zeros((self.num_layers, self.num_experts))
    self._slots = np.asarray(self.state.slots_per_layer)[:, None]  # int[L,1]
    self.target_mask = np.zeros((self.num_layers, self.num_experts), bool)
    self.target_updates = 0

  @property
  def targets(self) -> list[np.ndarray]:
    """Per layer, int32 ids of the target experts, ascending."""
    return [np.flatnonzero(row).astype(np.int32) for row in self.target_mask]

  def _incoming_mask(self) -> np.ndarray:
    """bool[L,E]: resident now, or arriving with a pending write."""
    present = self.state.resident_mask().copy()
    for w in self._pending:
      present[w.layer, w.expert] = True
    return present

  def hold_resident(self, shares=None) -> None:
    self.target_mask = self.state.resident_mask().copy()

  def update_targets(self) -> None:
    """target_mask[l] = the top-K_l experts of scores[l]."""
    ids = np.broadcast_to(np.arange(self.num_experts), self.scores.shape)
    planned = self._incoming_mask()
    for w in self._pending:  # evicted experts are leaving: no tie preference for them
      if w.evicted >= 0:
        planned[w.layer, w.evicted] = False
    order = rank_by_score(self.scores, planned, self.hysteresis)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, ids, axis=-1)
    self.target_mask = rank < self._slots
    self.target_updates += 1

  def _priorities(self, in_score: np.ndarray, out_score: np.ndarray) -> np.ndarray:
    """float[L,R] worth of candidate writes (out_score is 0 for empty slots); higher goes first."""
    raise NotImplementedError

  def _plan(self, room: int) -> list[SlotWrite]:
    if self._RETARGET_ON_PLAN:
      self.update_targets()
    # An expert still committed in a slot that a pending write evicts is "present" too: it cannot load
    # elsewhere before that write lands (commits come in any order; it would sit in two slots).
    missing = self.target_mask & ~self._incoming_mask()
    if not missing.any():
      return []
    num_layers, num_experts = self.scores.shape
    leaving = np.zeros_like(missing)
    free_empty = self.state.empty_slots().copy()
    for w in self._pending:  # busy slots are not re-planned
      if w.evicted >= 0:
        leaving[w.layer, w.evicted] = True
      else:
        free_empty[w.layer] -= 1
    victims = self.state.resident_mask() & ~self.target_mask & ~leaving
    r = min(room, num_experts)
    # Per layer, the R best incoming experts and the R best slots to fill, paired in order.
    rows = np.arange(num_layers)[:, None]
    incoming = np.argsort(np.where(missing, -self.scores, np.inf), axis=1, kind="stable")[:, :r]
    in_ok, in_score = missing[rows, incoming], self.scores[rows, incoming]
    by_score = np.argsort(np.where(victims, self.scores, np.inf), axis=1, kind="stable")
    col = np.arange(r)[None, :]
    is_empty = col < free_empty[:, None]
    evicted = by_score[rows, np.clip(col - free_empty[:, None], 0, num_experts - 1)]
    out_ok = is_empty | victims[rows, evicted]
    victim_score = self.scores[rows, evicted]
    evicted = np.where(is_empty, -1, evicted)
    ok = in_ok & out_ok & (in_score > np.where(is_empty, self._EMPTY_SCORE, (1.0 + self.hysteresis) * victim_score))
    priority = self._priorities(in_score, np.where(is_empty, 0.0, victim_score))
    layers, ranks = np.nonzero(ok)
    chosen = np.lexsort((ranks, layers, -priority[layers, ranks]))[:room]
    slot_of = self.state.slot_of()
    writes = []
    for layer, k in zip(layers[chosen].tolist(), ranks[chosen].tolist()):
      out = int(evicted[layer, k])
      if out >= 0:
        slot = int(slot_of[layer, out])
      else:  # the k-th empty slot without a pending write
        busy = self._busy_slots(layer)
        slot = [s for s in np.flatnonzero(self.state.slot_expert[layer] < 0).tolist() if s not in busy][k]
      writes.append(SlotWrite(layer, slot, int(incoming[layer, k]), out))
    return writes


class ImportanceSwapController(_RankedController):
  """SwapMoE's Virtual Experts policy (paper §3; SWAPMOE.md §2), for masked routing.

  Importance is a decayed sum of Eq. 1: when a call brings tokens to layer l,
  scores[l] <- decay * scores[l] + importance[l]. Layers without tokens in a call (the encoder while
  decoding) keep their scores, so each layer's window counts its own inputs (~1 / (1 - decay) of
  them), not decode steps of the other stack. Every `update_every` observed calls the targets become
  the top-K_l by score; writes towards them are ranked by the importance gained, as a share of the
  layer's total, so that layers compare fairly whatever their activation norms.

  `term`: what a call adds to a score — "eq1" (default): Eq. 1's Σ ‖x‖·G(x)_i·‖E_i‖; "counts": the
  tokens the router wanted the expert for; "routed": Σ ‖x‖·G(x)_i, Eq. 1 without the expert's norm
  (needs `expert_norms` [L, E]). See `IMPORTANCE_TERMS` and the ablation in the README.

  `hysteresis` h >= 0: when the targets are chosen a resident expert's score counts (1 + h) times, and a
  write needs the incoming score above (1 + h) times the evicted one's. Scores are non-negative, so h
  is a relative margin: an expert enters only when it is clearly more important than the one it
  replaces, not on noise between windows (each swap costs a transfer).
  """

  policy = "swapmoe"
  _RETARGET_ON_PLAN = False

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None, update_every: int = DEFAULT_UPDATE_EVERY,
               max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, decay: float = DEFAULT_DECAY,
               hysteresis: float = 0.0, term: str = "eq1", expert_norms=None):
    if term not in IMPORTANCE_TERMS:
      raise ValueError(f"importance_term must be one of {', '.join(IMPORTANCE_TERMS)}, got {term!r}")
    if term == "routed" and expert_norms is None:
      raise ValueError("importance_term 'routed' needs the experts' norms")
    if update_every < 1:
      raise ValueError(f"update_every must be >= 1, got {update_every}")
    if not 0 < decay <= 1:
      raise ValueError(f"decay must be in (0, 1], got {decay}")
    if not (np.isfinite(hysteresis) and hysteresis >= 0):
      raise ValueError(f"hysteresis must be a finite number >= 0, got {hysteresis}")
    super().__init__(num_experts, slots_per_layer, initial_resident, max_swaps_per_step)
    self.update_every = int(update_every)
    self.decay = float(decay)
    self.hysteresis = float(hysteresis)
    self.term = term
    self._norms = None if expert_norms is None else np.maximum(np.asarray(expert_norms, np.float64), 1e-30)
    self.update_targets()  # the initial residents: nothing moves before the first update
    self.target_updates = 0

  def hold_resident(self, shares=None) -> None:
    super().hold_resident()
    if shares is not None:
      total = self.scores.sum(axis=1, keepdims=True)
      self.scores = np.where(total > 0, np.asarray(shares, np.float64) * total, self.scores)

  def _observe(self, stats: RoutingStats) -> None:
    active = stats.active_layers()
    if self.term == "counts":
      gained = stats.wanted.astype(np.float64)
    elif self.term == "routed":
      gained = stats.importance / self._norms
    else:
      gained = stats.importance
    self.scores[active] = self.decay * self.scores[active] + gained[active]
    if self.observations % self.update_every == 0:
      self.update_targets()

  def _priorities(self, in_score: np.ndarray, out_score: np.ndarray) -> np.ndarray:
    total = self.scores.sum(axis=1, keepdims=True)
    return (in_score - out_score) / np.where(total > 0, total, np.inf)


class SelectiveSwapController(ImportanceSwapController):
  """SwapMoE's importance-driven swaps under selective routing (`router.py`): the resident set that
  serves the most importance also reads the fewest misses from the host bank, so the policy is
  `ImportanceSwapController`'s; a class of its own names it in telemetry."""

  policy = "selective"


class FallbackSwapController(ImportanceSwapController):
  """SwapMoE's importance-driven swaps under fallback routing (misses served by int8 copies on the
  device, `moe/quant.py`): the policy is `ImportanceSwapController`'s; a class of its own names it in
  telemetry."""

  policy = "fallback"


class LRUController(_RankedController):
  """Least recently used (mixtral-offloading), for exact routing.

  scores hold the step at which each expert was last wanted (-1: never). The most recently missed
  experts load first; a victim is the least recently used resident expert, and since an incoming
  expert must be more recent than its victim, experts wanted in the current step are never evicted.
  Experts never wanted do not fill empty slots.
  """

  policy = "lru"
  _EMPTY_SCORE = -1.0

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None,
               max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP):
    super().__init__(num_experts, slots_per_layer, initial_resident, max_swaps_per_step)
    self.scores[:] = -1.0
    self.clock = 0

  def tick(self) -> None:
    """Starts a new step; `observe` does this itself, callers of `observe_used` alone must."""
    self.clock += 1

  def observe_used(self, layer: int, experts_used: Iterable[int]) -> list[int]:
    """Records that tokens wanted `experts_used` in `layer` this step; returns those not resident."""
    used = np.unique(np.fromiter((int(e) for e in experts_used), np.int64))
    if used.size and (used[0] < 0 or used[-1] >= self.num_experts):
      raise ValueError(f"expert ids must be in [0, {self.num_experts}), got {used.tolist()}")
    self.scores[layer, used] = self.clock
    resident = self.state.index_map(layer)
    return [int(e) for e in used if resident[e] < 0]

  def _observe(self, stats: RoutingStats) -> None:
    self.tick()
    self.scores[stats.used()] = self.clock

  def _priorities(self, in_score: np.ndarray, out_score: np.ndarray) -> np.ndarray:
    return in_score


class DecayedFrequencyController(_RankedController):
  """LFU with decay, for exact routing: keep the experts wanted in the most steps, recent ones counting more.

  When a step brings tokens to layer l: scores[l] <- decay * scores[l] + [expert wanted this step].
  Frequency of steps (not tokens, not importance) because under exact routing each step in which a
  non-resident expert is wanted costs one copy, however many tokens want it. Unlike LRU, an expert used
  once does not evict one used in most recent steps. Experts never wanted do not fill empty slots.
  """

  policy = "lfu"
  _EMPTY_SCORE = 0.0

  def __init__(self, num_experts: int, slots_per_layer: Sequence[int],
               initial_resident: Sequence[Iterable[int]] | None,
               max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, decay: float = DEFAULT_LFU_DECAY):
    if not 0 < decay <= 1:
      raise ValueError(f"decay must be in (0, 1], got {decay}")
    super().__init__(num_experts, slots_per_layer, initial_resident, max_swaps_per_step)
    self.decay = float(decay)

  def _observe(self, stats: RoutingStats) -> None:
    active = stats.active_layers()
    self.scores[active] = self.decay * self.scores[active] + stats.used()[active]

  def _priorities(self, in_score: np.ndarray, out_score: np.ndarray) -> np.ndarray:
    return in_score - out_score


def make_controller(policy: str, num_experts: int, slots_per_layer: Sequence[int],
                    initial_resident: Sequence[Iterable[int]] | None = None, *,
                    update_every: int = DEFAULT_UPDATE_EVERY,
                    max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP,
                    decay: float | None = None, hysteresis: float | None = None,
                    importance_term: str | None = None, expert_norms=None) -> SwapController:
  """The controller for a policy name in POLICIES ('full' defaults to every expert resident);
  `importance_term` and `expert_norms`: see `ImportanceSwapController` (its `term`)."""
  if decay is not None and policy in ("lru", "full", "pruned"):
    raise ValueError(f"decay applies to policies swapmoe, selective, fallback and lfu, not {policy!r}")
  if hysteresis is not None and policy not in IMPORTANCE_POLICIES:
    raise ValueError(f"hysteresis applies to policies swapmoe, selective and fallback, not {policy!r}")
  if importance_term is not None and policy not in IMPORTANCE_POLICIES:
    raise ValueError(f"importance_term applies to policies swapmoe, selective and fallback, not {policy!r}")
  if policy in IMPORTANCE_POLICIES:
    cls = {"swapmoe": ImportanceSwapController, "selective": SelectiveSwapController,
           "fallback": FallbackSwapController}[policy]
    return cls(num_experts, slots_per_layer, initial_resident, update_every, max_swaps_per_step,
               DEFAULT_DECAY if decay is None else decay, DEFAULT_HYSTERESIS if hysteresis is None else hysteresis,
               importance_term or "eq1", expert_norms)
  if policy == "lru":
    return LRUController(num_experts, slots_per_layer, initial_resident, max_swaps_per_step)
  if policy == "lfu":
    return DecayedFrequencyController(num_experts, slots_per_layer, initial_resident, max_swaps_per_step,
                                      DEFAULT_LFU_DECAY if decay is None else decay)
  if policy == "full":
    if any(k != num_experts for k in slots_per_layer):
      raise ValueError(f"policy 'full' needs K_l = E = {num_experts} in every layer, got {list(slots_per_layer)}")
    if initial_resident is None:
      initial_resident = [range(num_experts)] * len(slots_per_layer)
    return StaticController(num_experts, slots_per_layer, initial_resident, "full")
  if policy == "pruned":
    return StaticController(num_experts, slots_per_layer, initial_resident, "pruned")
  raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
