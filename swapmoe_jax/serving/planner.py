"""The planner: choose K_l (resident slots per MoE layer) and the swap cadence under a memory budget.

SWAPMOE.md §2: the paper searches {K_1..K_L, frequency} with a genetic algorithm over a fitted accuracy
predictor, and found equal K per layer measurably worse. Every slot costs the same bytes (one expert), so
with a per-layer objective that is concave in K_l a greedy allocation is already optimal; this file
offers that (`plan_calibrated`), equal slots (`plan_uniform`), everything resident (`plan_full`) and K_l
as the caller gives it (`plan_explicit`).

Each plan's `breakdown.total` is at most the budget, always (the paper overshot; we do not).

With `devices` = n > 1 (expert parallelism, `sharding.py`) the budget and the breakdown are per device:
each layer's K_l slots are split evenly over the n devices, so every K_l is a multiple of n (the
planners round down to one), and each device holds K_l / n slots plus its own copy of the rest.

Policy "fallback" (`fallback=True`) also holds an int8 copy of every expert on the device
(`budget.fallback_bytes`), a fixed cost counted before any slot: at a given budget it holds fewer
full-precision experts than "swapmoe".

Axis letters: L MoE layers, E experts, K slots.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from swapmoe_jax.serving.budget import (
    BudgetError, MemoryBreakdown, arrays_within, check_min_budget, expert_bytes_each, fallback_bits,
    format_bytes, memory_breakdown)
from swapmoe_jax.models.switch.config import SwitchConfig

# The paper's `frequency`, counted in device calls (one prefill or one decode step). A decode step
# sees one token per row, so one call's importance is noisy; 16 calls average enough tokens and keep
# the target-recomputation cost (a top-K over [L,E] in numpy) off most steps.
DEFAULT_UPDATE_EVERY = 16
# Experts copied per step, and in flight at once (each needs a staging buffer). SWAPMOE.md §5: one
# switch-base expert (bf16, 9.4 MB) moves in 0.2-0.4 ms from pinned host memory; a switch-base-64
# decode step takes ~0.76 ms, so two copies per step hide behind compute.
DEFAULT_MAX_SWAPS_PER_STEP = 2


@dataclasses.dataclass(frozen=True)
class Plan:
  """A residency plan.

  Attributes:
    slots_per_layer: K_l per MoE layer, in `config.moe_layers` order.
    update_every: device calls between recomputations of the target resident set (paper: frequency).
    max_swaps_per_step: experts written per step and in flight at once; 0 when all are resident.
    breakdown: the accelerator bytes of this plan; `breakdown.total <= budget_bytes`.
    reason: why these numbers, for humans.
    method: 'uniform', 'calibrated', 'explicit' or 'full'.
    staging_slots: device buffers for incoming experts, = max_swaps_per_step.
    budget_bytes: the budget planned for (None for an unconstrained `plan_full`).
    devices: devices the slots are split over; `breakdown` and `budget_bytes` are then per device.
  """

  slots_per_layer: tuple[int, ...]
  update_every: int
  max_swaps_per_step: int
  breakdown: MemoryBreakdown
  reason: str
  method: str
  staging_slots: int = 0
  budget_bytes: int | None = None
  devices: int = 1

  @property
  def resident_experts(self) -> int:
    return sum(self.slots_per_layer)


def _check_cadence(update_every: int, max_swaps_per_step: int) -> None:
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}")
  if max_swaps_per_step < 1:
    raise ValueError(f"max_swaps_per_step must be >= 1, got {max_swaps_per_step}")


def _check_devices(config: SwitchConfig, devices: int) -> None:
  if devices < 1 or config.num_experts % devices:
    raise ValueError(f"the {config.num_experts} experts of each MoE layer do not split evenly over {devices} "
                     f"devices; use a device count that divides {config.num_experts}")


def _full_fits(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, devices, fallback=False) -> bool:
  """Whether every expert fits, with no staging (nothing ever swaps)."""
  full = memory_breakdown(config, dtype_bytes, [config.num_experts] * config.num_moe_layers, batch, src_len,
                          tgt_len, 0, devices, fallback)
  return full.total <= budget_bytes


def _slot_capacity(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, staging_slots, devices,
                   fallback=False, bank_reads=0) -> int:
  """How many expert slots (over all layers) fit on each device, after the minimum; raises BudgetError
  below it."""
  check_min_budget(budget_bytes, config, dtype_bytes, batch, src_len, tgt_len, staging_slots, devices, fallback,
                   bank_reads)
  base = memory_breakdown(config, dtype_bytes, [devices] * config.num_moe_layers, batch, src_len, tgt_len,
                          staging_slots, devices, fallback, bank_reads)
  # A plan's total is its arrays plus the allocator margin on them (`MemoryBreakdown`): the arrays may
  # take the largest A with A + allocator_margin(A) <= budget.
  one_expert = expert_bytes_each(config, dtype_bytes)
  arrays = arrays_within(budget_bytes, one_expert)
  extra = (arrays - (base.total - base.allocator_bytes)) // one_expert
  return min(config.num_moe_layers + extra, config.num_moe_layers * config.num_experts // devices)


def _make_plan(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, slots, update_every,
               max_swaps_per_step, method, reason, devices, fallback=False, bank_reads=0) -> Plan:
  """A Plan with one staging buffer per write in flight (and `bank_reads` experts read in a step)."""
  breakdown = memory_breakdown(config, dtype_bytes, slots, batch, src_len, tgt_len, max_swaps_per_step, devices,
                               fallback, bank_reads)
  if budget_bytes is not None and breakdown.total > budget_bytes:  # the invariant, not a user error
    raise AssertionError(f"plan exceeds its budget: {breakdown.total} > {budget_bytes}")
  use = f"uses {format_bytes(breakdown.total)}"
  if budget_bytes is not None:
    use += f" of {format_bytes(budget_bytes)} ({breakdown.total} <= {budget_bytes} bytes)"
  if devices > 1:
    reason += f", split over {devices} devices"
    use += " per device"
  return Plan(tuple(int(k) for k in slots), update_every, max_swaps_per_step, breakdown,
              f"{reason}; {use}: {breakdown}", method, max_swaps_per_step, budget_bytes, devices)


def _all_resident(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, update_every, method,
                  devices, fallback=False) -> Plan:
  """Every expert resident: no staging, and max_swaps_per_step 0 (nothing ever swaps)."""
  slots = [config.num_experts] * config.num_moe_layers
  return _make_plan(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, slots, update_every, 0, method,
                    f"all {config.num_experts} experts of each of {len(slots)} MoE layers resident, no swaps",
                    devices, fallback)


def plan_full(config: SwitchConfig, budget_bytes: int | None, dtype_bytes, batch: int, src_len: int,
              tgt_len: int, update_every: int = DEFAULT_UPDATE_EVERY,
              max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, devices: int = 1) -> Plan:
  """Every expert resident (K_l = E), no staging. Raises BudgetError if a given budget cannot hold it."""
  _check_cadence(update_every, max_swaps_per_step)
  _check_devices(config, devices)
  if budget_bytes is not None:
    need = memory_breakdown(config, dtype_bytes, [config.num_experts] * config.num_moe_layers, batch,
                            src_len, tgt_len, 0, devices).total
    if need > budget_bytes:
      where = "" if devices == 1 else f" on each of {devices} devices"
      raise BudgetError(f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) cannot hold the full "
                        f"model, which needs {format_bytes(need)} ({need} bytes){where}")
  return _all_resident(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, update_every, "full", devices)


def plan_uniform(config: SwitchConfig, budget_bytes: int, dtype_bytes, batch: int, src_len: int,
                 tgt_len: int, update_every: int = DEFAULT_UPDATE_EVERY,
                 max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, devices: int = 1,
                 fallback: bool = False, bank_reads: int = 0, all_resident_if_fits: bool = True) -> Plan:
  """The largest equal K <= E that fits; leftover slots go to layers in order (one per device each, so
  that every K_l stays a multiple of `devices`). `fallback`: the int8 copies are counted first;
  `bank_reads`: the experts exact and selective routing copy from host memory in a step
  (`budget.bank_read_experts`), likewise. `all_resident_if_fits`: a budget that holds every expert
  makes them all resident (False for a budget in experts, K < E, which asks for K per layer even where
  its bytes, with the staging and in-step copies that K < E needs, would hold every expert of a tiny
  model).

  Raises:
    BudgetError: when the budget is below `min_budget_bytes` (the message states the minimum).
  """
  _check_cadence(update_every, max_swaps_per_step)
  _check_devices(config, devices)
  num_layers, e = config.num_moe_layers, config.num_experts
  if all_resident_if_fits and _full_fits(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, devices,
                                        fallback):
    return _all_resident(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, update_every, "uniform",
                         devices, fallback)
  capacity = _slot_capacity(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, max_swaps_per_step,
                            devices, fallback, bank_reads)
  k, leftover = divmod(capacity, num_layers)
  slots = [devices * (k + (1 if layer < leftover else 0)) for layer in range(num_layers)]
  return _make_plan(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, slots, update_every,
                    max_swaps_per_step, "uniform",
                    f"equal K={devices * k} of {e} experts per MoE layer, +{devices} for the first {leftover} "
                    "layer(s)" + (f", int{fallback_bits(fallback)} copies of all" if fallback else ""), devices,
                    fallback, bank_reads)


def layer_coverage(importance: np.ndarray, slots_per_layer) -> np.ndarray:
  """float64[L]: share of each layer's importance held by its top-K_l experts.

  Each layer is normalised to sum 1 (a layer that saw no importance counts as uniform), so layers with
  large activation norms do not crowd out the others: what is scarce per layer is the fraction of
  routing mass that keeps its preferred expert, which is what masked gating loses.
  """
  shares = _normalised(importance)
  ranked = -np.sort(-shares, axis=1)
  return np.array([ranked[layer, :k].sum() for layer, k in enumerate(slots_per_layer)])


def _normalised(importance: np.ndarray) -> np.ndarray:
  imp = np.asarray(importance, dtype=np.float64)
  totals = imp.sum(axis=1, keepdims=True)
  uniform = np.full_like(imp, 1.0 / imp.shape[1])
  return np.where(totals > 0, imp / np.where(totals > 0, totals, 1.0), uniform)


def plan_calibrated(config: SwitchConfig, budget_bytes: int, dtype_bytes, batch: int, src_len: int,
                    tgt_len: int, importance: np.ndarray, update_every: int = DEFAULT_UPDATE_EVERY,
                    max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, devices: int = 1,
                    fallback: bool = False, allocations=None, bank_reads: int = 0,
                    all_resident_if_fits: bool = True) -> Plan:
  """K_l from calibration importance: each next slot to the layer whose coverage grows most.

  With `allocations` ({total slots: K per layer}, found by `allocation.search_allocations` on
  calibration requests and stored with the calibration), the plan starts from the stored allocation of
  the largest total that fits, and only the slots beyond it are handed out by coverage; where none fits
  (or with `devices` > 1, which the search does not cover), coverage alone decides, from one slot per
  layer. The marginal gain of layer l's (k+1)-th slot is its (k+1)-th largest
  normalised importance (`layer_coverage`). Gains fall with k in every layer and slots all cost one
  expert's bytes, so this greedy maximises the summed coverage for the slot count that fits. Ties go to
  the layer with fewer slots, then the earlier layer; slots that gain nothing are still handed out while
  they fit, round-robin, since calibration may have missed experts that real inputs use. With
  `devices` = n, slots are handed out n at a time (one per device), the gain being the sum of the
  next n normalised importances, which also falls with k.

  Args:
    importance: float[L,E], Eq. 1 importance summed over calibration inputs with the unmasked router.
    fallback: count the int8 copies of every expert first (policy "fallback").
    bank_reads: count the experts exact and selective routing copy from host memory in a step first.
    all_resident_if_fits: as in `plan_uniform`.

  Raises:
    BudgetError: when the budget is below `min_budget_bytes`.
    ValueError: when `importance` has the wrong shape, or negative or non-finite entries.
  """
  _check_cadence(update_every, max_swaps_per_step)
  _check_devices(config, devices)
  num_layers, e, n = config.num_moe_layers, config.num_experts, devices
  imp = np.asarray(importance, dtype=np.float64)
  if imp.shape != (num_layers, e):
    raise ValueError(f"importance must be [L={num_layers}, E={e}], got shape {imp.shape}")
  if not np.all(np.isfinite(imp)) or np.any(imp < 0):
    raise ValueError("importance must be finite and non-negative")
  if all_resident_if_fits and _full_fits(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, n, fallback):
    return _all_resident(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, update_every,
                         "calibrated", n, fallback)
  capacity = _slot_capacity(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, max_swaps_per_step, n,
                            fallback, bank_reads)
  ranked = -np.sort(-_normalised(imp), axis=1)
  searched = _searched_start(allocations, capacity, num_layers, e) if n == 1 else None
  slots = list(searched) if searched else [n] * num_layers
  heap = [(-ranked[layer, k:k + n].sum(), k, layer) for layer, k in enumerate(slots) if k < e]
  heapq.heapify(heap)
  for _ in range(capacity - sum(slots) // n):
    _, _, layer = heapq.heappop(heap)
    k = slots[layer] = slots[layer] + n
    if k < e:
      heapq.heappush(heap, (-ranked[layer, k:k + n].sum(), k, layer))
  coverage = layer_coverage(imp, slots)
  cov = ", ".join(f"{c:.3f}" for c in coverage)
  if searched:
    how = f"from the searched allocation {list(searched)} of {sum(searched)} slots"
    how += f", {capacity - sum(searched)} more by calibrated importance" if capacity > sum(searched) else ""
  else:
    how = "chosen greedily by calibrated importance"
  return _make_plan(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, slots, update_every,
                    max_swaps_per_step, "calibrated",
                    f"K per layer {slots} of {e} experts, {how}; "
                    f"coverage per layer [{cov}] (mean {coverage.mean():.3f})", n, fallback, bank_reads)


def _searched_start(allocations, capacity: int, num_layers: int, num_experts: int) -> tuple[int, ...] | None:
  """The stored allocation of the largest total slot count <= `capacity`, or None."""
  fitting = [total for total in (allocations or {}) if total <= capacity]
  if not fitting:
    return None
  slots = tuple(int(k) for k in allocations[max(fitting)])
  if len(slots) != num_layers or any(not 1 <= k <= num_experts for k in slots) or sum(slots) != max(fitting):
    raise ValueError(f"allocation for {max(fitting)} slots must be {num_layers} K_l in [1, {num_experts}] "
                     f"summing to it, got {list(slots)}")
  return slots


def local_search(start, score, *, num_experts: int, max_rounds: int = 6, min_gain: float = 0.0,
                 on_score=None, known=None) -> tuple[tuple[int, ...], list[dict]]:
  """Hill-climbing over allocations of a fixed slot count, one slot moved between two layers at a time.

  Each round scores every allocation one move away from the current one (each K_l stays in [1,
  `num_experts`]) and moves to the best when it beats the current by more than `min_gain`; it stops
  after `max_rounds` rounds or when no move does. Allocations are scored once each (memoised).

  Args:
    start: K per layer to start from.
    score: K per layer (a tuple) -> a float, higher is better (e.g. requests whose answer equals the
      full model's).
    on_score: called with (slots, score) after each new scoring (progress).
    known: {slots: score} already measured (not scored again, not in the trace).

  Returns:
    The allocation reached and the trace: one {"slots", "score", "round"} per scoring, in order.
  """
  scores = {tuple(int(k) for k in slots): float(v) for slots, v in (known or {}).items()}
  trace: list[dict] = []

  def scored(slots, rnd):
    if slots not in scores:
      scores[slots] = float(score(slots))
      trace.append(dict(slots=list(slots), score=scores[slots], round=rnd))
      if on_score is not None:
        on_score(slots, scores[slots])
    return scores[slots]

  current = tuple(int(k) for k in start)
  scored(current, 0)
  for rnd in range(1, max_rounds + 1):
    moves = []
    for src in range(len(current)):
      for dst in range(len(current)):
        if src != dst and current[src] > 1 and current[dst] < num_experts:
          nxt = list(current)
          nxt[src] -= 1
          nxt[dst] += 1
          moves.append(tuple(nxt))
    if not moves:
      break
    for m in moves:
      scored(m, rnd)
    best = max(moves, key=scores.__getitem__)  # the first of equals
    if scores[best] <= scores[current] + min_gain:
      break
    current = best
  return current, trace


def plan_explicit(config: SwitchConfig, budget_bytes: int, dtype_bytes, batch: int, src_len: int, tgt_len: int,
                  slots_per_layer, update_every: int = DEFAULT_UPDATE_EVERY,
                  max_swaps_per_step: int = DEFAULT_MAX_SWAPS_PER_STEP, devices: int = 1,
                  fallback: bool = False, bank_reads: int = 0) -> Plan:
  """K_l as given, one per MoE layer, checked against the budget: for comparing allocations at equal
  bytes (the planners above choose K_l; this one only checks it). With `devices` = n every K_l must be
  a multiple of n.

  Raises:
    ValueError: a wrong number of layers, or a K_l outside [n, E] or not a multiple of n.
    BudgetError: the slots do not fit the budget (the message says how many do), or the budget is below
      `min_budget_bytes`.
  """
  _check_cadence(update_every, max_swaps_per_step)
  _check_devices(config, devices)
  num_layers, e, n = config.num_moe_layers, config.num_experts, devices
  slots = [int(k) for k in slots_per_layer]
  if len(slots) != num_layers:
    raise ValueError(f"slots per layer: give one K per MoE layer ({num_layers}), got {len(slots)}: {slots}")
  if any(not n <= k <= e or k % n for k in slots):
    raise ValueError(f"slots per layer {slots}: each K must be in [{n}, {e}]"
                     + (f" and a multiple of {n} devices" if n > 1 else ""))
  if all(k == e for k in slots):
    if not _full_fits(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, n, fallback):
      raise BudgetError(f"budget {format_bytes(budget_bytes)} cannot hold every expert ({slots})")
    return _all_resident(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, update_every, "explicit", n,
                         fallback)
  capacity = _slot_capacity(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, max_swaps_per_step, n,
                            fallback, bank_reads)
  if sum(slots) // n > capacity:
    raise BudgetError(f"slots per layer {slots} ({sum(slots)} experts) do not fit the budget of "
                      f"{format_bytes(budget_bytes)}: it holds {capacity * n} over the {num_layers} MoE layers")
  return _make_plan(config, budget_bytes, dtype_bytes, batch, src_len, tgt_len, slots, update_every,
                    max_swaps_per_step, "explicit", f"K per layer {slots} of {e} experts, as given", n, fallback,
                    bank_reads)
