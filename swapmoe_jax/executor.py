"""Copies experts into slots: asynchronous staging from host memory, then one donated, jitted commit.

The controllers (`swap.py`) decide *which* expert goes to *which* slot; this file moves the bytes.
Every commit writes a fixed number of rows (`max_writes`; unused rows target an out-of-range slot and
are dropped), so the shapes of every program are fixed and a swap never recompiles. A commit writes the
slots and the index maps together, and device programs run in issue order, so every decode step sees
a resident set whose index map and buffer agree.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.decode import Flat, unflat
from swapmoe_jax.store import HostExpertStore
from swapmoe_jax.swap import SlotWrite


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _commit(layer_paths, slots, staged, slot_idx, index_maps):
  """slots: the model's slot state (donated); staged: M rows of (wi [1, D, F], wo [1, F, D]);
  slot_idx: int32[L, M] (target slot per staged row and layer, out of range = not this layer);
  index_maps: int32[L, E]. Returns the new slot state (a `Flat` when given one)."""
  flat = isinstance(slots, Flat)
  slots = unflat(slots)
  staged_wi = jnp.concatenate([wi for wi, _ in staged])
  staged_wo = jnp.concatenate([wo for _, wo in staged])
  pure = nnx.to_pure_dict(slots)
  for l, (stack, i) in enumerate(layer_paths):
    moe = pure[stack]["blocks"][i]["moe"]
    moe["wi"] = moe["wi"].at[slot_idx[l]].set(staged_wi.astype(moe["wi"].dtype), mode="drop")
    moe["wo"] = moe["wo"].at[slot_idx[l]].set(staged_wo.astype(moe["wo"].dtype), mode="drop")
    moe["slot_of"] = index_maps[l]
  nnx.replace_by_pure_dict(slots, pure)
  return Flat.of(slots) if flat else slots


class SwapExecutor:
  """Stages experts from the host store and commits them into the model's slots.

  Args:
    store: the host expert store.
    layer_paths: (stack, block) per MoE layer (`config.moe_layers`).
    slots_per_layer: K_l per layer.
    max_writes: rows per commit (the controller's `max_swaps_per_step`).
  """

  def __init__(self, store: HostExpertStore, layer_paths: Sequence[tuple[str, int]],
               slots_per_layer: Sequence[int], max_writes: int):
    self.store = store
    self.layer_paths = tuple(layer_paths)
    self.slots_per_layer = tuple(slots_per_layer)
    self.max_writes = max(1, int(max_writes))
    self.experts_written = 0
    self.bytes_written = 0
    # The row that pads a commit to `max_writes` rows; its slot index is out of range, so it is dropped.
    self._pad = store.gather_to_device(0, [0])

  def stage(self, writes: Sequence[SlotWrite]) -> tuple:
    """Starts the host->device copies of the incoming experts (asynchronous, one fixed-shape program
    per expert). Returns `max_writes` rows of (wi [1, D, F], wo [1, F, D])."""
    if len(writes) > self.max_writes:
      raise ValueError(f"{len(writes)} writes exceed max_writes={self.max_writes}")
    rows = [self.store.gather_to_device(w.layer, [w.expert]) for w in writes]
    return tuple(rows) + (self._pad,) * (self.max_writes - len(rows))

  def commit(self, slots, staged, writes: Sequence[SlotWrite], index_maps: Sequence[np.ndarray]):
    """Writes staged rows into their slots and installs the index maps; returns the new slot state
    (the old one is donated)."""
    num_layers = len(self.layer_paths)
    slot_idx = np.empty((num_layers, self.max_writes), np.int32)
    slot_idx[:] = np.asarray(self.slots_per_layer, np.int32)[:, None]  # out of range: dropped
    for j, w in enumerate(writes):
      slot_idx[w.layer, j] = w.slot
    maps = np.stack([np.asarray(m, np.int32) for m in index_maps])
    new = _commit(self.layer_paths, slots, staged, slot_idx, maps)
    self.experts_written += len(writes)
    self.bytes_written += len(writes) * self.store.expert_bytes
    return new

  def apply(self, slots, writes: Sequence[SlotWrite], index_maps: Sequence[np.ndarray]):
    """stage + commit; returns (new slots, host seconds spent dispatching)."""
    t0 = time.perf_counter()
    staged = self.stage(writes)
    new = self.commit(slots, staged, writes, index_maps)
    return new, time.perf_counter() - t0
