"""Expert parallelism on the device: the slots of an MoE layer split over a 1-D device mesh (axis "expert").

The slot buffers wi [K, F, D], wo [K, D, F] are sharded on K (device j holds slots [j K/n, (j+1) K/n));
the host bank, when exact routing reads misses, is sharded on E the same way. The expert FFNs run
under `shard_map`: each device computes the tokens routed to its own slots and one psum of the [N, D]
outputs combines them. Left to GSPMD, the decode path's per-token dynamic slices all-gathered the
whole slot buffer onto every device (seen in the compiled HLO on 8 CPU devices), which would defeat
the purpose. The runtime side (sharded host store, swaps to a slot's owner, placing dense weights)
is `serving/sharding.py`.

Axis letters: N tokens, D d_model, F d_ff, E experts, K slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from swapmoe_jax.moe import experts as experts_lib

EXPERT_AXIS = "expert"


def expert_mesh(devices) -> Mesh:
  """`load`'s `devices` argument -> a 1-D mesh with axis "expert".

  devices: a count n (the first n of `jax.devices()`), a list of distinct `jax.Device`s, or a `Mesh`
  whose only axis is named "expert".
  """
  if isinstance(devices, Mesh):
    if devices.axis_names != (EXPERT_AXIS,):
      raise ValueError(f"the mesh must have the single axis {EXPERT_AXIS!r}, got axes {devices.axis_names}")
    return devices
  if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    available = jax.devices()
    if not 1 <= devices <= len(available):
      hint = (" (on the CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N set "
              "before JAX starts)" if available[0].platform == "cpu" else "")
      raise ValueError(f"devices={devices}, but {len(available)} {available[0].platform} device(s) are "
                       f"available{hint}")
    return Mesh(np.array(available[:devices]), (EXPERT_AXIS,))
  try:
    devices = list(devices)
  except TypeError:
    raise ValueError(f"devices must be a count, a list of jax devices or a Mesh, got {devices!r}") from None
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise ValueError(f"devices must be a non-empty list of jax devices, got {devices!r}")
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices lists a device twice: {devices}")
  return Mesh(np.array(devices), (EXPERT_AXIS,))


def mesh_devices(mesh: Mesh) -> list:
  """The mesh's devices in slot order: device j owns slots [j K/n, (j+1) K/n) of every layer."""
  return list(mesh.devices.flat)


# --- device side: expert FFNs over slots (and host banks) split on axis 0 --------------------------


def _on_owners(mesh: Mesh, fn, x, index, valid, *weights):
  """fn over the entries of `weights` (arrays split over the mesh on axis 0, all of the same length
  there) that each device owns.

  x: [N, D] (replicated); index: int32[N] into the global axis 0 of the weights; valid: bool[N].
  On each device: fn(x, local index, valid & owned, *local weights) -> [N, D], zeroed where the
  device does not own the token's index; the psum over devices returns [N, D], replicated.
  """
  def local(x, index, valid, *weights):
    size = weights[0].shape[0]
    lo = jax.lax.axis_index(EXPERT_AXIS) * size
    mine = (index >= lo) & (index < lo + size)
    y = fn(x, jnp.where(mine, index - lo, 0), valid & mine, *weights)
    return jax.lax.psum(jnp.where(mine[:, None], y, 0).astype(x.dtype), EXPERT_AXIS)

  split, rep = PartitionSpec(EXPERT_AXIS), PartitionSpec()
  # check_vma off: experts.py's one-device code branches (lax.cond) between a per-device value and
  # zeros, which the varying-axis check rejects; the psum makes the output replicated, as declared.
  return jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep) + (split,) * len(weights), out_specs=rep,
                       check_vma=False)(x, index, valid, *weights)


def expert_parallel(mesh: Mesh):
  """(expert_ffn, expert_ffn_misses) with `experts.py`'s signatures, for slot buffers sharded on K
  and host banks sharded on E over `mesh`."""
  def ffn(x, slot, wi, wo, act, *, keep=None, capacity=None, grouped=None):
    keep = jnp.ones(slot.shape, bool) if keep is None else keep
    return _on_owners(mesh, lambda x, s, k, wi, wo: experts_lib.expert_ffn(
        x, s, wi, wo, act, keep=k, capacity=capacity, grouped=grouped), x, slot, keep, wi, wo)

  def misses(x, expert, miss, bank_wi, bank_wo, act, decode=True):
    return _on_owners(mesh, lambda x, e, m, wi, wo: experts_lib.expert_ffn_misses(x, e, m, wi, wo, act, decode),
                      x, expert, miss, bank_wi, bank_wo)

  return ffn, misses


def fallback_parallel(mesh: Mesh):
  """`experts.expert_ffn_fallback`'s counterpart for fallback copies split on E over `mesh` (device j
  holds the copies of experts [j E/n, (j+1) E/n), as it holds that part of the host bank): each device
  computes the misses of its own experts and the psum combines them."""
  def fallback(x, expert, miss, copies, act):
    return _on_owners(mesh, lambda x, e, m, *local: experts_lib.expert_ffn_fallback(x, e, m, local, act),
                      x, expert, miss, *copies)

  return fallback
