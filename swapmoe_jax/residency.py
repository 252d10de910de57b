"""Serving-time glue between the device step and the host policy: statistics in, slot writes out.

After each device call is dispatched, `Residency.after_dispatch` (1) reads the *previous* call's
routing statistics (that call has finished or is about to; the current one is already queued, so the
device stays busy), (2) lets the controller learn from them, and (3) stages and commits up to
`max_swaps_per_step` expert writes, which the next call sees. Nothing here blocks on the call just
dispatched.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from swapmoe_jax.config import SwitchConfig
from swapmoe_jax.executor import SwapExecutor
from swapmoe_jax.stats import RoutingStats, StepRecord, Telemetry
from swapmoe_jax.swap import SwapController

EXACT_POLICIES = ("lru", "lfu")  # "full" needs no bank: everything is resident
MASKED_POLICIES = ("swapmoe", "pruned")


def routing_stats(cfg: SwitchConfig, enc=None, dec=None) -> RoutingStats:
  """Device LayerStats of the encoder and/or decoder MoE layers -> host RoutingStats over all L layers."""
  num_enc = len(cfg.encoder_sparse_layers)
  e = cfg.num_experts
  imp = np.zeros((cfg.num_moe_layers, e))
  wanted = np.zeros((cfg.num_moe_layers, e), np.int64)
  served = np.zeros((cfg.num_moe_layers, e), np.int64)
  redirected = np.zeros((cfg.num_moe_layers,), np.int64)
  for part, lo in ((enc, 0), (dec, num_enc)):
    if part is None:
      continue
    part = jax.device_get(part)
    n = part.importance.shape[0]
    imp[lo:lo + n] = part.importance
    wanted[lo:lo + n] = part.wanted
    served[lo:lo + n] = part.served
    redirected[lo:lo + n] = part.redirected
  return RoutingStats(imp, wanted, served, redirected)


class Residency:
  """A policy at work: controller (which experts), executor (bytes), telemetry (what happened)."""

  def __init__(self, cfg: SwitchConfig, controller: SwapController, executor: SwapExecutor | None,
               telemetry: Telemetry):
    self.cfg = cfg
    self.controller = controller
    self.executor = executor
    self.telemetry = telemetry
    self._prev = None  # (enc stats, dec stats) of the last dispatched call, still on the device
    self._calls = 0
    self.totals = RoutingStats.zeros(cfg.num_moe_layers, cfg.num_experts)  # merged over all calls
    telemetry.set_resident(controller.state.slot_expert)

  def after_dispatch(self, slots, enc=None, dec=None):
    """Call right after dispatching a device call whose statistics are `enc`/`dec` (device arrays).
    Returns the slot state the next call must use."""
    slots = self._observe_previous(slots)
    self._prev = (enc, dec)
    return slots

  def flush(self, slots):
    """Learns from the last call (end of a request); returns the slot state."""
    return self._observe_previous(slots)

  def _observe_previous(self, slots):
    if self._prev is None:
      return slots
    t0 = time.perf_counter()
    stats = routing_stats(self.cfg, *self._prev)
    wait_s = time.perf_counter() - t0
    self._prev = None
    self.totals = self.totals.merge(stats)
    hits, misses = self.controller.observe(stats)
    writes = self.controller.next_writes() if self.executor is not None else []
    transfer_s = 0.0
    if writes:
      planned = [self.controller.planned_slots(l) for l in range(self.controller.num_layers)]
      maps = [_index_map(p, self.cfg.num_experts) for p in planned]
      slots, transfer_s = self.executor.apply(slots, writes, maps)
      # Device programs run in issue order: every later call sees these slots, so the writes landed.
      self.controller.commit(writes)
      self.telemetry.set_resident(self.controller.state.slot_expert)
    self.telemetry.add(StepRecord.from_stats(
        self._calls, stats, hits=hits, misses=misses, experts_swapped=len(writes),
        bytes_swapped=len(writes) * (self.executor.store.expert_bytes if self.executor else 0),
        transfer_s=transfer_s, wait_s=wait_s))
    self._calls += 1
    return slots


def _index_map(slot_expert: np.ndarray, num_experts: int) -> np.ndarray:
  out = np.full((num_experts,), -1, np.int32)
  for s, e in enumerate(slot_expert):
    if e >= 0:
      out[e] = s
  return out
