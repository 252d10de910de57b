"""Expert parallelism, the runtime side: stores, swaps and dense weights over a 1-D device mesh.

When one accelerator is not enough (a TPU v2-8 has eight cores of 8 GiB each), `load(..., devices=n)`
spreads each MoE layer's slot buffers over n devices:
- the slot buffers wi [K, F, D], wo [K, D, F] are sharded on K (`NamedSharding(mesh, P("expert"))`):
  device j holds slots [j K/n, (j+1) K/n), so every K_l is a multiple of n (the planner rounds down);
- index maps, dense weights (`dense_spec`), KV caches and activations are replicated;
- the expert FFNs run under `shard_map` (`moe/parallel.py`, on the layer's side): each device
  computes the tokens routed to its own slots and one psum of the [N, D] outputs combines them;
  `mark_expert_parallel` below tells each MoE layer of a model which mesh to use;
- host memory holds each expert once: each layer's host bank is split by expert over the devices'
  host memories (`pinned_host` where the platform has it). Exact routing (lru, lfu) reads a missing
  expert inside the step from the host shard of the device that holds it; the psum delivers the output;
- a swap into slot s is staged from the expert's host shard to the device that owns s (a device-to-
  device copy when the two differ), written in place into that device's shard alone by the executor's
  donated one-slot write (compiled for every device at load), and the global buffer is reassembled
  from its shards without copying.
The budget is per device: `budget.memory_breakdown(..., devices=n)` counts K_l / n slots per layer and
a full copy of everything else on each device.

Axis letters: N tokens, D d_model, F d_ff, E experts, K slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from swapmoe_jax.moe import VirtualExpertMoE
from swapmoe_jax.moe.parallel import EXPERT_AXIS, expert_mesh, mesh_devices  # noqa: F401  (expert_mesh: re-exported for the loader)
from swapmoe_jax.serving.executor import SwapExecutor, _write_slot
from swapmoe_jax.serving.store import HostExpertStore
from swapmoe_jax.serving.swap import SlotWrite


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def dense_spec(path: tuple, shape: tuple) -> PartitionSpec:
  """Where each dense weight goes (path: its keys in the params tree, e.g. ('decoder', 'blocks', 1,
  'attn', 'q'); shape: its shape). Every dense weight is replicated today. This rule is the one place
  to change to shard some of them instead, e.g. the [V, D] embedding on V over "expert"; the budget
  counts dense weights as replicated, which then stays an upper bound."""
  del path, shape
  return PartitionSpec()


# The parameters of an MoE layer under fallback routing that hold a copy of every expert (`moe/quant.py`):
# split on E over the mesh as the host bank is, so that each device holds E / n experts' copies.
FALLBACK_COPIES = ("wi_q", "wi_scale", "wo_q", "wo_scale")


def dense_placer(mesh: Mesh):
  """A `loader._fill` placer: each dense weight straight to its devices, by `dense_spec`; fallback
  routing's expert copies split on E (`FALLBACK_COPIES`)."""
  def put(path, value, dtype):
    value = np.asarray(value).astype(dtype)
    spec = PartitionSpec(EXPERT_AXIS) if path[-1] in FALLBACK_COPIES else dense_spec(path, value.shape)
    return jax.device_put(value, NamedSharding(mesh, spec))
  return put


def mark_expert_parallel(model, mesh: Mesh) -> None:
  """Tells every MoE layer of `model` (before `nnx.split`) to compute its experts over `mesh`."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, VirtualExpertMoE):
      module.expert_mesh = mesh


# --- host side: the expert store, split by expert ----------------------------------------------------


class ShardedExpertStore:
  """Every expert in host memory once, split by expert over the mesh devices' host memories.

  Device j's host memory holds experts [j E/n, (j+1) E/n) of every layer, as a `HostExpertStore` of
  its own (`parts[j]`). Offers what the loader, executor and exact routing use of a `HostExpertStore`
  (norms, expert_bytes, num_layers, num_experts, memory_kind, banks), staging to any device with
  `gather_to`.
  """

  def __init__(self, mesh: Mesh, parts: Sequence[HostExpertStore], norms: np.ndarray):
    self.mesh = mesh
    self.parts = list(parts)
    self.norms = np.asarray(norms, np.float32)
    self.experts_per_device = parts[0].num_experts
    self.memory_kind = parts[0].memory_kind
    self._banks = None

  @classmethod
  def from_numpy(cls, experts: list[tuple[np.ndarray, np.ndarray]], norms: np.ndarray, dtype, mesh: Mesh):
    devices = mesh_devices(mesh)
    e = experts[0][0].shape[0]
    if e % len(devices):
      raise ValueError(f"the {e} experts of each MoE layer do not split evenly over {len(devices)} devices; "
                       f"use a device count that divides {e}")
    per = e // len(devices)
    parts = [HostExpertStore.from_numpy([(a[j * per:(j + 1) * per], b[j * per:(j + 1) * per]) for a, b in experts],
                                        np.asarray(norms)[:, j * per:(j + 1) * per], dtype, device=dev)
             for j, dev in enumerate(devices)]
    return cls(mesh, parts, norms)

  @property
  def num_layers(self) -> int:
    return self.parts[0].num_layers

  @property
  def num_experts(self) -> int:
    return self.experts_per_device * len(self.parts)

  @property
  def expert_bytes(self) -> int:
    return self.parts[0].expert_bytes

  def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert's (wi [F, D], wo [D, F]) as host numpy arrays (`HostExpertStore.expert`)."""
    j, local = divmod(int(e), self.experts_per_device)
    return self.parts[j].expert(layer, local)

  def gather_to(self, layer: int, expert: int, device: jax.Device) -> tuple[jax.Array, jax.Array]:
    """Copies one expert to `device` (asynchronous): from its host shard to the device that holds
    that shard, then on to `device` if it is another. Returns wi [1, F, D], wo [1, D, F]."""
    j, local = divmod(int(expert), self.experts_per_device)
    part = self.parts[j]
    rows = part.gather_to_device(layer, [local])
    return rows if part.device == device else jax.device_put(rows, SingleDeviceSharding(device))

  def to(self, device: jax.Device) -> "_StagingView":
    """This store as seen by `loader._fill_slots` filling buffers on `device`."""
    return _StagingView(self, device)

  def banks(self) -> tuple:
    """Per layer (wi [E, F, D], wo [E, D, F]): global arrays split on E over the mesh in host memory
    (assembled from the parts without copying), the arguments exact routing reads misses from."""
    if self._banks is None:
      if self.memory_kind is None:  # numpy parts: the jitted step moves them (as on one device)
        join = lambda arrays: np.concatenate(arrays)  # noqa: E731
      else:
        sharding = NamedSharding(self.mesh, PartitionSpec(EXPERT_AXIS), memory_kind=self.memory_kind)
        join = lambda arrays: jax.make_array_from_single_device_arrays(  # noqa: E731
            (self.num_experts,) + arrays[0].shape[1:], sharding, arrays)
      self._banks = tuple((join([p.wi[l] for p in self.parts]), join([p.wo[l] for p in self.parts]))
                          for l in range(self.num_layers))
    return self._banks


class _StagingView:
  """A `ShardedExpertStore` with the face of a `HostExpertStore` on one device (what `_fill_slots` reads)."""

  def __init__(self, store: ShardedExpertStore, device: jax.Device):
    self.store, self.device = store, device
    self.expert_shapes = store.parts[0].expert_shapes

  def gather_to_device(self, layer: int, experts) -> tuple[jax.Array, jax.Array]:
    (expert,) = experts
    return self.store.gather_to(layer, expert, self.device)


def fill_slots(mesh: Mesh, store: ShardedExpertStore, layer: int, experts: np.ndarray, dtype, fill_one):
  """Slot buffers wi [K, F, D], wo [K, D, F] of one layer, sharded on K: each device's shard filled in
  place by `fill_one(store_view, layer, its experts, dtype)` (`loader._fill_slots`), then assembled."""
  devices = mesh_devices(mesh)
  k = len(experts)
  if k % len(devices):
    raise ValueError(f"MoE layer {layer}: {k} slots do not split evenly over {len(devices)} devices; "
                     f"K must be a multiple of {len(devices)}")
  per = k // len(devices)
  shards = [fill_one(store.to(dev), layer, experts[j * per:(j + 1) * per], dtype) for j, dev in enumerate(devices)]
  sharding = NamedSharding(mesh, PartitionSpec(EXPERT_AXIS))
  return tuple(jax.make_array_from_single_device_arrays((k,) + parts[0].shape[1:], sharding, list(parts))
               for parts in zip(*shards))


# --- swaps: stage to the slot's owner, write its shard alone ------------------------------------------


def _shards(x: jax.Array, devices) -> list:
  by_device = {s.device: s.data for s in x.addressable_shards}
  return [by_device[d] for d in devices]


class ShardedSwapExecutor(SwapExecutor):
  """`SwapExecutor` for slot buffers sharded on K over a mesh: an expert goes from host memory to the
  device that owns its slot, and only that device's shard is rewritten (in place, donated)."""

  def __init__(self, store: ShardedExpertStore, layer_paths, slots_per_layer, max_writes: int, mesh: Mesh):
    super().__init__(store, layer_paths, slots_per_layer, max_writes)
    self.devices = mesh_devices(mesh)
    self._replicated = replicated(mesh)

  def _owner(self, w: SlotWrite) -> tuple[int, int]:
    """(device index, slot within that device's shard) of a write."""
    return divmod(w.slot, self.slots_per_layer[w.layer] // len(self.devices))

  def stage(self, writes: Sequence[SlotWrite], reuse: bool = False) -> tuple:
    """Gathers each write's expert to the device that owns its slot (`reuse` does not apply: each
    write is its own gather)."""
    if len(writes) > self.max_writes:
      raise ValueError(f"{len(writes)} writes exceed max_writes={self.max_writes}")
    return tuple(self.store.gather_to(w.layer, w.expert, self.devices[self._owner(w)[0]]) for w in writes)

  def _write_row(self, leaves, positions, row_wi, row_wo, w, index_map):
    a, b, m = positions
    j, local = self._owner(w)
    wi, wo = _shards(leaves[a], self.devices), _shards(leaves[b], self.devices)
    wi[j], wo[j], _ = _write_slot(wi[j], wo[j], row_wi, row_wo, np.int32(local), index_map)
    leaves[a] = jax.make_array_from_single_device_arrays(leaves[a].shape, leaves[a].sharding, wi)
    leaves[b] = jax.make_array_from_single_device_arrays(leaves[b].shape, leaves[b].sharding, wo)
    leaves[m] = jax.device_put(index_map, self._replicated)

  def warm_up(self, slots, resident: Sequence[np.ndarray], index_maps: Sequence[np.ndarray]):
    """Compiles every program a swap runs, at load: the staging gather from each device's host shard,
    and the one-slot write on each device for every distinct K_l (rewriting a resident expert in
    place). Returns the slot state."""
    for j, device in enumerate(self.devices):
      self.store.gather_to(0, j * self.store.experts_per_device, device)
    for k in sorted(set(self.slots_per_layer)):
      layer = self.slots_per_layer.index(k)
      for j in range(len(self.devices)):
        slot = j * (k // len(self.devices))
        e = int(resident[layer][slot])
        w = SlotWrite(layer, slot, e, e)
        slots = self.commit(slots, self.stage([w]), [w], index_maps)
    self.experts_written = self.bytes_written = 0
    return slots


def shard_bytes(x: jax.Array) -> dict:
  """{device: bytes of x held there}: what each device really holds of a (sharded) array."""
  return {s.device: s.data.nbytes for s in x.addressable_shards}
