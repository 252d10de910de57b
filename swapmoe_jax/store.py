"""Host expert store: every expert of every MoE layer, read once from the checkpoint into host memory.

Experts live in `pinned_host` memory where the platform offers it (fast, asynchronous DMA to the
device), otherwise in numpy. Swaps copy from here, never from disk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding


def host_memory_kind(device: jax.Device) -> str | None:
  """'pinned_host' when `device` can address it, else None (numpy host arrays)."""
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # pragma: no cover - platforms without memory kinds
    return None
  return "pinned_host" if "pinned_host" in kinds else None


@dataclasses.dataclass
class HostExpertStore:
  """Per MoE layer l: wi[l] [E, D, F], wo[l] [E, F, D] in host memory; norms [L, E] float32."""

  wi: list
  wo: list
  norms: np.ndarray
  device: jax.Device
  memory_kind: str | None

  @classmethod
  def from_numpy(cls, experts: list[tuple[np.ndarray, np.ndarray]], norms: np.ndarray, dtype, device=None):
    device = device or jax.devices()[0]
    kind = host_memory_kind(device)
    wi, wo = [], []
    for a, b in experts:
      a, b = np.asarray(a).astype(dtype, copy=False), np.asarray(b).astype(dtype, copy=False)
      if kind is not None:
        sharding = SingleDeviceSharding(device, memory_kind=kind)
        a, b = jax.device_put(a, sharding), jax.device_put(b, sharding)
      wi.append(a)
      wo.append(b)
    return cls(wi=wi, wo=wo, norms=np.asarray(norms, np.float32), device=device, memory_kind=kind)

  @property
  def num_layers(self) -> int:
    return len(self.wi)

  @property
  def num_experts(self) -> int:
    return int(self.wi[0].shape[0])

  @property
  def expert_bytes(self) -> int:
    """Bytes of one expert (wi + wo)."""
    a, b = self.wi[0], self.wo[0]
    return int((a[0].size + b[0].size) * jnp.dtype(a.dtype).itemsize)

  def banks(self) -> tuple:
    """Per layer (wi, wo): the arguments that exact routing reads misses from inside the step."""
    return tuple(zip(self.wi, self.wo))

  def gather_to_device(self, layer: int, experts) -> tuple[jax.Array, jax.Array]:
    """Copies experts of one layer to the device (asynchronous). Returns wi [n, D, F], wo [n, F, D]."""
    idx = np.asarray(experts, np.int32)
    dev = SingleDeviceSharding(self.device)
    if self.memory_kind is None:  # numpy host arrays: gather on the host, one transfer
      return jax.device_put(self.wi[layer][idx], dev), jax.device_put(self.wo[layer][idx], dev)
    return _gather(self.wi[layer], self.wo[layer], jax.device_put(idx, dev))


@jax.jit
def _gather(wi, wo, idx):
  take = lambda bank: jnp.stack(  # noqa: E731
      [jax.device_put(jax.lax.dynamic_index_in_dim(bank, idx[j], keepdims=False), jax.memory.Space.Device)
       for j in range(idx.shape[0])])
  return take(wi), take(wo)
