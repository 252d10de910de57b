"""Host expert store: every expert of every MoE layer, read once from the checkpoint into host memory.

Experts live in `pinned_host` memory where the platform offers it (fast, asynchronous DMA to the
device), otherwise in numpy. Swaps copy from here, never from disk.
"""

from __future__ import annotations

import functools

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


class HostExpertStore:
  """Every expert of every MoE layer in host memory, in one of two layouts.

  * rows (the start): each expert its own pair of host arrays, wi [1, F, D] and wo [1, D, F]. A swap
    stages an expert with one `device_put` of its pair: in `pinned_host` memory that is a DMA on a
    transfer stream, which runs while the decode programs run on the compute stream.
  * banks (built by `banks()`, which exact routing needs): per layer wi [E, F, D], wo [E, D, F], which
    the jitted step indexes to read a missing expert inside the step. Staging then gathers from the
    banks in a small program (on the compute stream). Building the banks releases the rows, so host
    memory holds one copy of the experts either way.
  With numpy host arrays (no `pinned_host` memory kind), rows are views of the banks.

  Every matrix is kept as torch's Linear stores it, [out, in], the orientation of the slot buffers
  (`moe/experts.py` says why); `from_numpy` takes the checkpoint's [in, out] and transposes.

  Attributes: norms float32[L, E]; device; memory_kind ('pinned_host' or None).
  """

  def __init__(self, wi: list, wo: list, norms: np.ndarray, device: jax.Device, memory_kind: str | None,
               rows: list | None = None):
    self._wi, self._wo, self._rows = wi, wo, rows
    self.norms = np.asarray(norms, np.float32)
    self.device = device
    self.memory_kind = memory_kind
    first = rows[0][0] if rows is not None else (wi[0][:1], wo[0][:1])
    self.expert_shapes = (tuple(first[0].shape[1:]), tuple(first[1].shape[1:]))
    self.dtype = first[0].dtype
    self._num_layers = len(rows) if rows is not None else len(wi)
    self._num_experts = len(rows[0]) if rows is not None else int(wi[0].shape[0])
    self._index = None  # device scalars 0..E-1 (`stage_rows`)
    self._staging: list = []  # (wi [1, F, D], wo [1, D, F]) staging buffers (`stage_rows(..., reuse=True)`)

  @classmethod
  def from_numpy(cls, experts: list[tuple[np.ndarray, np.ndarray]], norms: np.ndarray, dtype, device=None,
                 pinned: bool = True, banks: bool = False):
    """experts: per MoE layer (wi [E, D, F], wo [E, F, D]) in the checkpoint's [in, out] orientation;
    transposed to [out, in] one layer at a time.

    pinned: hold the experts in the device's pinned host memory where it has one (needed by exact
    routing and the "transfer"/"gather" stagings); False keeps ordinary numpy banks, as `to_pageable`
    leaves them, without passing through pinned memory — which XLA caps (64 GB by default on a GPU:
    a Mixtral-8x7B's 87 GiB of experts did not fit) and which would hold the experts twice meanwhile.
    banks: start in the banks layout (one pinned array per layer and matrix) instead of rows, for a
    caller that will ask for `banks()` anyway (exact and selective routing, "gather" staging): the
    experts are then copied into pinned memory once, where rows-then-banks copies them there, back out
    and in again (switch-large-128 with `lfu`, 49 GiB of experts: set up in 230 s on an H200's host,
    random weights drawn included, where the rows path had not finished in 280 s).
    """
    device = device or jax.devices()[0]
    kind = host_memory_kind(device) if pinned else None
    wi, wo, rows = [], [], []
    host = SingleDeviceSharding(device, memory_kind=kind) if kind is not None else None
    for a, b in experts:
      a, b = (np.ascontiguousarray(np.swapaxes(np.asarray(x).astype(dtype, copy=False), 1, 2)) for x in (a, b))
      if kind is None:
        wi.append(a)
        wo.append(b)
      elif banks:
        wi.append(jax.device_put(a, host))
        wo.append(jax.device_put(b, host))
      else:
        rows.append([tuple(jax.device_put(x[e:e + 1], host) for x in (a, b)) for e in range(a.shape[0])])
    return cls(wi, wo, norms, device, kind, rows if kind is not None and not banks else None)

  @property
  def num_layers(self) -> int:
    return self._num_layers

  @property
  def num_experts(self) -> int:
    return self._num_experts

  @property
  def expert_bytes(self) -> int:
    """Bytes of one expert (wi + wo)."""
    return int((np.prod(self.expert_shapes[0]) + np.prod(self.expert_shapes[1])) * jnp.dtype(self.dtype).itemsize)

  @property
  def layout(self) -> str:
    """'rows' (per-expert arrays, staged by device_put) or 'banks' (stacked, once `banks()` ran;
    numpy banks where memory_kind is None)."""
    return "rows" if self._rows is not None else "banks"

  @property
  def wi(self) -> list:
    """Per layer wi [E, F, D]. Builds the banks on first use (see `banks()`): to read one expert
    without changing the layout, use `expert`."""
    return self._banks()[0]

  @property
  def wo(self) -> list:
    """Per layer wo [E, D, F]; builds the banks on first use like `wi`."""
    return self._banks()[1]

  def expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert's (wi [F, D], wo [D, F]) as host numpy arrays, in either layout (neither changes)."""
    if self._rows is not None:
      return tuple(np.asarray(x)[0] for x in self._rows[layer][int(e)])
    return np.asarray(self._wi[layer][int(e)]), np.asarray(self._wo[layer][int(e)])

  def _banks(self):
    if self._rows is not None:  # pinned rows -> pinned banks, one layer at a time
      host = SingleDeviceSharding(self.device, memory_kind=self.memory_kind)
      for layer in range(self.num_layers):
        for j, out in ((0, self._wi), (1, self._wo)):
          out.append(jax.device_put(np.concatenate([np.asarray(r[j]) for r in self._rows[layer]]), host))
        self._rows[layer] = None
      self._rows = None
    return self._wi, self._wo

  def to_pageable(self) -> None:
    """Moves every expert into ordinary (pageable) numpy banks, one layer at a time, releasing the
    pinned arrays: swaps then stage by `device_put` from numpy, which the runtime copies through its own
    pinned buffers (no host memory kept per copy, unlike `device_put` out of `pinned_host` arrays).
    Exact routing cannot read such banks inside the step: it needs the pinned layout."""
    if self.memory_kind is None:
      return
    wi, wo = [], []
    for layer in range(self.num_layers):
      if self._rows is not None:
        pairs = self._rows[layer]
        wi.append(np.concatenate([np.asarray(p[0]) for p in pairs]))
        wo.append(np.concatenate([np.asarray(p[1]) for p in pairs]))
        self._rows[layer] = None
      else:
        wi.append(np.asarray(self._wi[layer]))
        wo.append(np.asarray(self._wo[layer]))
        self._wi[layer] = self._wo[layer] = None
    self._wi, self._wo, self._rows, self.memory_kind = wi, wo, None, None

  def banks(self) -> tuple:
    """Per layer (wi, wo): the arguments that exact routing reads misses from inside the step."""
    return tuple(zip(*self._banks()))

  def gather_to_device(self, layer: int, experts) -> tuple[jax.Array, jax.Array]:
    """Copies experts of one layer to the device (asynchronous, `stage_rows`). Returns wi [n, F, D],
    wo [n, D, F]."""
    rows = self.stage_rows([(layer, e) for e in np.asarray(experts).reshape(-1)])
    if len(rows) == 1:
      return rows[0]
    return tuple(jnp.concatenate(x) for x in zip(*rows))

  def stage_rows(self, pairs, reuse: bool = False) -> tuple:
    """Copies experts of any layers to the device in one batched operation (asynchronous): one
    `device_put` call for every array of the rows layout, one program for the banks layout.

    Args:
      pairs: (layer, expert) per row, at most a handful (a commit's writes).
      reuse: (banks layout in pinned memory) land the rows in this store's staging buffers, made on
        first use and written in place from then on, instead of in new device buffers. A swap's commit
        reads its rows at once, so the swap path reuses them; the rows returned by one call are valid
        until the next call with reuse. A swap then allocates no device memory, so on a GPU the decode
        programs' own buffers keep their addresses after a swap and XLA need not re-record its CUDA
        graphs of them (with fresh rows, GPU soaks showed host memory climbing with swaps;
        benchmarks/RESULTS.md, "A swap that allocates nothing").
    Returns:
      One (wi [1, F, D], wo [1, D, F]) per pair.
    """
    pairs = [(int(l), int(e)) for l, e in pairs]
    if not pairs:
      return ()
    dev = SingleDeviceSharding(self.device)
    if self._rows is not None:
      return tuple(jax.device_put([self._rows[l][e] for l, e in pairs], dev))
    if self.memory_kind is None:
      return tuple(jax.device_put([(self._wi[l][e:e + 1], self._wo[l][e:e + 1]) for l, e in pairs], dev))
    if self._index is None:  # every expert index as an int32 device scalar, in one transfer, once
      self._index = jax.device_put([np.int32(e) for e in range(self.num_experts)], dev)
    idx = tuple(self._index[e] for _, e in pairs)
    wi_banks, wo_banks = tuple(self._wi[l] for l, _ in pairs), tuple(self._wo[l] for l, _ in pairs)
    if not reuse:
      wi, wo = _gather_rows(wi_banks, wo_banks, idx)
      return tuple(zip(wi, wo))
    while len(self._staging) < len(pairs):
      self._staging.append(tuple(jnp.zeros((1,) + shape, self.dtype, device=dev) for shape in self.expert_shapes))
    n = len(pairs)
    into = tuple(self._staging[:n])
    wi, wo = _gather_rows_into(wi_banks, wo_banks, idx, tuple(r[0] for r in into), tuple(r[1] for r in into))
    self._staging[:n] = list(zip(wi, wo))
    return tuple(zip(wi, wo))

  @property
  def staging_bytes(self) -> int:
    """Device bytes held by the staging buffers that `stage_rows(..., reuse=True)` made."""
    return len(self._staging) * self.expert_bytes


def _take_rows(banks, idx):
  """Row j: expert idx[j] of banks[j] (a host bank), copied to device memory."""
  return tuple(jax.device_put(jax.lax.dynamic_index_in_dim(bank, i, keepdims=True), jax.memory.Space.Device)
               for bank, i in zip(banks, idx))


@jax.jit
def _gather_rows(wi_banks, wo_banks, idx):
  """Row j of the result is expert idx[j] of wi_banks[j] / wo_banks[j] (host banks, one per row: a
  bank can repeat), copied to device memory. One program per row count, whichever the layers."""
  return _take_rows(wi_banks, idx), _take_rows(wo_banks, idx)


@functools.partial(jax.jit, donate_argnums=(3, 4))
def _gather_rows_into(wi_banks, wo_banks, idx, wi_into, wo_into):
  """`_gather_rows`, written into the donated rows wi_into / wo_into (updated in place)."""
  put = lambda into, rows: tuple(jax.lax.dynamic_update_slice(a, r.astype(a.dtype), (0, 0, 0))  # noqa: E731
                                 for a, r in zip(into, rows))
  return put(wi_into, _take_rows(wi_banks, idx)), put(wo_into, _take_rows(wo_banks, idx))
