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

from swapmoe_jax.serving.decode import Flat, unflat
from swapmoe_jax.serving.store import HostExpertStore
from swapmoe_jax.serving.swap import SlotWrite


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _write_slot_in_place(wi, wo, slot_of, row_wi, row_wo, slot, expert):
  """One layer's buffers wi [K, F, D], wo [K, D, F] and index map slot_of int32[E] (all donated, updated
  in place): slot `slot` gets expert `expert`'s row_wi [1, F, D] / row_wo [1, D, F], and the map says so
  (the expert that held the slot maps to -1). Every argument is already on the device: on an H200, with a
  decode call in flight, a write cost the host 0.26 ms when its slot and planned map came from the host
  (`_write_slot`) and 0.08 ms so (`benchmarks/swap_dispatch.py`), and writes are issued between calls."""
  wi = jax.lax.dynamic_update_slice_in_dim(wi, row_wi.astype(wi.dtype), slot, axis=0)
  wo = jax.lax.dynamic_update_slice_in_dim(wo, row_wo.astype(wo.dtype), slot, axis=0)
  slot_of = jnp.where(slot_of == slot, -1, slot_of).at[expert].set(slot)
  return wi, wo, slot_of


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_slot(wi, wo, row_wi, row_wo, slot, index_map):
  """One layer's buffers wi [K, F, D], wo [K, D, F] (donated, updated in place): slot `slot` gets
  row_wi [1, F, D] / row_wo [1, D, F]; returns them with the layer's new index map int32[E].

  A single dynamic_update_slice per buffer: measured on an H200, a scatter over every layer's buffer
  (out-of-range rows dropped) cost 2.3 ms per commit, as much as rewriting the whole resident set."""
  wi = jax.lax.dynamic_update_slice_in_dim(wi, row_wi.astype(wi.dtype), slot, axis=0)
  wo = jax.lax.dynamic_update_slice_in_dim(wo, row_wo.astype(wo.dtype), slot, axis=0)
  return wi, wo, index_map


def slot_leaf_positions(slots, layer_paths) -> list[tuple[int, int, int]]:
  """Per MoE layer, the positions of its wi, wo and slot_of among the flattened slot state's leaves.

  A layer (stack, i) lives at `stack/blocks/i/moe` (an encoder-decoder), or at `blocks/i/moe` in a
  decoder-only model, whose one stack is not a level of its tree."""
  leaves = jax.tree_util.tree_flatten_with_path(unflat(slots))[0]  # same order as Flat.of(slots)
  index = {tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): n
           for n, (path, _) in enumerate(leaves)}

  def find(stack, i, name):
    path = ("blocks", i, "moe", name)
    return index[(stack,) + path] if (stack,) + path in index else index[path]

  return [tuple(find(stack, i, name) for name in ("wi", "wo", "slot_of")) for stack, i in layer_paths]


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
    self._positions = None  # leaf positions of each layer's buffers, found on the first commit
    self._scalars = None  # int32 device scalars 0..max(E, K)-1: a write's slot and expert (`_scalar`)

  def stage(self, writes: Sequence[SlotWrite], reuse: bool = False) -> tuple:
    """Starts the host->device copies of the incoming experts, all in one batched operation
    (asynchronous; `HostExpertStore.stage_rows`). Returns one row (wi [1, F, D], wo [1, D, F]) per write.
    reuse: land the rows in the store's staging buffers, valid only until the next such stage (`apply`,
    which commits them at once, reuses; a caller that holds staged rows across stages must not)."""
    if len(writes) > self.max_writes:
      raise ValueError(f"{len(writes)} writes exceed max_writes={self.max_writes}")
    return self.store.stage_rows([(w.layer, w.expert) for w in writes], reuse=reuse)

  def commit(self, slots, staged, writes: Sequence[SlotWrite], index_maps: Sequence[np.ndarray]):
    """Writes each staged row into its slot (in place: the old buffers are donated) together with its
    layer's index map; returns the new slot state (a `Flat`, as `decode` takes it)."""
    slots = Flat.of(slots)
    if self._positions is None:
      self._positions = slot_leaf_positions(slots, self.layer_paths)
    leaves = list(slots.leaves)
    for (row_wi, row_wo), w in zip(staged, writes):
      self._write_row(leaves, self._positions[w.layer], row_wi, row_wo, w, np.asarray(index_maps[w.layer], np.int32))
    self.experts_written += len(writes)
    self.bytes_written += len(writes) * self.store.expert_bytes
    return Flat(slots.treedef, leaves)

  def _write_row(self, leaves: list, positions: tuple[int, int, int], row_wi, row_wo, w: SlotWrite,
                 index_map: np.ndarray) -> None:
    """Writes one staged row into `leaves` (the flat slot state, replaced in place; `positions`: the
    layer's wi, wo, slot_of) and updates the layer's index map on the device, where it is the map the
    host planned (`index_map`) once the commit's writes have landed: each write moves one expert into one
    slot. `sharding.ShardedSwapExecutor` overrides this."""
    a, b, m = positions
    leaves[a], leaves[b], leaves[m] = _write_slot_in_place(
        leaves[a], leaves[b], leaves[m], row_wi, row_wo, self._scalar(w.slot, leaves[m]),
        self._scalar(w.expert, leaves[m]))

  def _scalar(self, value: int, like: jax.Array) -> jax.Array:
    """The int32 device scalar `value`, on `like`'s device: made once for every value a write can name
    (slots and experts), in one transfer, and reused (no jitted call donates them)."""
    if self._scalars is None:
      n = max(self.store.num_experts, max(self.slots_per_layer))
      self._scalars = jax.device_put([np.int32(v) for v in range(n)], like.sharding)
    return self._scalars[value]

  def warm_up(self, slots, resident: Sequence[np.ndarray], index_maps: Sequence[np.ndarray]):
    """Compiles the write program for every distinct slot-buffer shape at load time, by rewriting one
    resident expert in place, and the staging program for every row count, so that no later swap
    compiles anything. Returns the slot state."""
    seen = set()
    for layer, k in enumerate(self.slots_per_layer):
      if k in seen:
        continue
      seen.add(k)
      w = SlotWrite(layer, 0, int(resident[layer][0]), int(resident[layer][0]))
      slots = self.commit(slots, self.stage([w], reuse=True), [w], index_maps)
    # The staging program of the banks layout has one shape per row count: compile them all now.
    for n in range(2, self.max_writes + 1):
      jax.block_until_ready(self.stage([SlotWrite(0, 0, int(resident[0][0]), -1)] * n, reuse=True))
    self.experts_written = self.bytes_written = 0
    return slots

  def apply(self, slots, writes: Sequence[SlotWrite], index_maps: Sequence[np.ndarray]):
    """stage + commit; returns (new slots, host seconds spent dispatching)."""
    t0 = time.perf_counter()
    staged = self.stage(writes, reuse=True)
    new = self.commit(slots, staged, writes, index_maps)
    return new, time.perf_counter() - t0
