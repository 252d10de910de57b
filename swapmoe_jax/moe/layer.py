"""The virtual-expert MoE layer: a Flax NNX module usable in any JAX model.

The router (always resident) scores all E experts; expert weights come from a fixed-shape slot buffer
`wi: [K, F, D]`, `wo: [K, D, F]` (torch Linear's [out, in] per expert, see `experts.py`) and an index
map `slot_of: int32[E]` (slot, or -1). Slots and map are
`ExpertSlots` / `SlotIndex` variables: split them out with `nnx.split` and pass them to jitted functions
as arguments, so that swapping experts changes values, never shapes, and never recompiles.
`place_experts` / `put_expert` fill and swap slots eagerly (for a model of one's own; the serving
engine swaps through `serving.executor.SwapExecutor`, in place, between jitted steps).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.moe import experts as experts_lib
from swapmoe_jax.moe import parallel
from swapmoe_jax.moe import router as router_lib
from swapmoe_jax.moe.activations import activation

RoutingMode = Literal["masked", "exact"]


class ExpertSlots(nnx.Variable):
  """Resident expert weights, [K, ...]: device memory that swaps overwrite in place."""


class SlotIndex(nnx.Variable):
  """int32[E]: the slot holding each expert, or -1."""


class ExpertNorms(nnx.Variable):
  """float32[E]: ‖E_i‖, constant per expert (computed at conversion), used by importance."""


class VirtualExpertMoE(nnx.Module):
  """Top-1 MoE over K resident slots ("virtual experts", SwapMoE).

  Args:
    d_model, d_ff, num_experts: D, F, E.
    num_slots: K (1 <= K <= E).
    capacity: HF expert capacity per batch row.
    act: activation name (HF ACT2FN).
    routing: "masked" (serve only resident experts; paper) or "exact" (a missing expert is read from the
      host bank passed to `__call__`, so outputs equal the fully resident model).
    gate_mode: "original" or "renormalized" (masked routing only).

  `expert_mesh` (static, default None): a mesh whose axis "expert" splits the slot axis K (and the host
  bank's E) over devices; set by `serving.sharding.mark_expert_parallel` before `nnx.split`.
  """

  expert_mesh = None

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      num_experts: int,
      num_slots: int,
      capacity: int,
      *,
      act: str = "relu",
      router_bias: bool = False,
      routing: RoutingMode = "masked",
      gate_mode: router_lib.GateMode = "original",
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if not 1 <= num_slots <= num_experts:
      raise ValueError(f"num_slots must be in [1, {num_experts}], got {num_slots}")
    if routing not in ("masked", "exact"):
      raise ValueError(f"routing must be 'masked' or 'exact', got {routing!r}")
    if gate_mode not in router_lib.GATE_MODES:
      raise ValueError(f"gate_mode must be one of {router_lib.GATE_MODES}, got {gate_mode!r}")
    self.router_w = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (d_model, num_experts), jnp.float32))
    self.router_b = nnx.Param(jnp.zeros((num_experts,), jnp.float32)) if router_bias else None
    init = nnx.initializers.normal(d_model**-0.5)
    self.wi = ExpertSlots(init(rngs.params(), (num_slots, d_ff, d_model), dtype))
    self.wo = ExpertSlots(init(rngs.params(), (num_slots, d_model, d_ff), dtype))
    slot_of = jnp.where(jnp.arange(num_experts) < num_slots, jnp.arange(num_experts), -1)
    self.slot_of = SlotIndex(slot_of.astype(jnp.int32))
    self.norms = ExpertNorms(jnp.ones((num_experts,), jnp.float32))
    self.capacity = capacity
    self.act_name = act
    self.routing = routing
    self.gate_mode = gate_mode

  @property
  def num_experts(self) -> int:
    return self.slot_of.shape[0]

  @property
  def num_slots(self) -> int:
    return self.wi.shape[0]

  def resident_experts(self) -> np.ndarray:
    """int32[K]: the expert in each slot, or -1 for a slot that no expert maps to."""
    slot_of = np.asarray(self.slot_of[...])
    out = np.full((self.num_slots,), -1, np.int32)
    held = np.flatnonzero(slot_of >= 0)
    out[slot_of[held]] = held
    return out

  def place_experts(self, experts, wi, wo) -> None:
    """Puts expert `experts[k]` in slot k for every k, and sets the index map to match.

    Eager, outside `jit`; it changes values, never shapes, so jitted functions that take the slots as
    arguments (see the module docstring) do not recompile.

    Args:
      experts: int[n], distinct experts in [0, E), n <= K; slots n..K-1 are left out of the index map.
      wi, wo: every expert's weights in the slots' orientation (torch Linear's [out, in]), [E, F, D] and
        [E, D, F] (numpy or jax arrays, any memory).
    """
    experts = np.asarray(experts)
    e, k = self.num_experts, self.num_slots
    if experts.ndim != 1 or not 1 <= experts.size <= k or not np.issubdtype(experts.dtype, np.integer):
      raise ValueError(f"experts must be 1 to K={k} integers, got {experts.tolist()}")
    if experts.min() < 0 or experts.max() >= e or len(set(experts.tolist())) != experts.size:
      raise ValueError(f"experts must be distinct and in [0, {e}), got {experts.tolist()}")
    self._check_bank("wi", wi, (e,) + self.wi.shape[1:])
    self._check_bank("wo", wo, (e,) + self.wo.shape[1:])
    n = experts.size
    self.wi[:n] = jnp.asarray(np.asarray(wi)[experts], self.wi.dtype)
    self.wo[:n] = jnp.asarray(np.asarray(wo)[experts], self.wo.dtype)
    slot_of = np.full((e,), -1, np.int32)
    slot_of[experts] = np.arange(n, dtype=np.int32)
    self.slot_of[...] = jnp.asarray(slot_of)

  def put_expert(self, slot: int, expert: int, wi, wo) -> int:
    """Writes one expert's weights wi [F, D], wo [D, F] into `slot` and points the index map at it;
    the slot's previous expert leaves the map. Eager, values only (no recompilation, as above).

    Returns:
      The expert evicted from `slot`, or -1 if the slot held none (or already held `expert`).
    """
    if not 0 <= slot < self.num_slots:
      raise ValueError(f"slot must be in [0, {self.num_slots}), got {slot}")
    if not 0 <= expert < self.num_experts:
      raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
    self._check_bank("wi", wi, self.wi.shape[1:])
    self._check_bank("wo", wo, self.wo.shape[1:])
    evicted = int(self.resident_experts()[slot])
    slot_of = np.array(self.slot_of[...])
    if evicted >= 0:
      slot_of[evicted] = -1
    slot_of[expert] = slot
    self.wi[slot] = jnp.asarray(wi, self.wi.dtype)
    self.wo[slot] = jnp.asarray(wo, self.wo.dtype)
    self.slot_of[...] = jnp.asarray(slot_of)
    return -1 if evicted == expert else evicted

  @staticmethod
  def _check_bank(name: str, array, shape: tuple) -> None:
    if tuple(np.shape(array)) != tuple(shape):
      raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(np.shape(array))}")

  def route(self, x: jax.Array) -> tuple[router_lib.Routing, jax.Array]:
    """x: [B, T, D] -> (the routing, float32 router probabilities [B, T, E]). A method of its own so
    that training can capture its outputs (`nnx.capture(..., method_outputs=...)`) for the
    load-balancing loss."""
    b = None if self.router_b is None else self.router_b[...]
    return router_lib.route(x, self.router_w[...], b, self.slot_of[...], self.capacity,
                            exact=self.routing == "exact", gate_mode=self.gate_mode)

  def __call__(
      self,
      x: jax.Array,
      token_mask: jax.Array | None = None,
      bank: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, router_lib.LayerStats, router_lib.Routing]:
    """x: [B, T, D]; token_mask: bool [B, T] (statistics only); bank: (wi [E, F, D], wo [E, D, F]) in host
    memory, required for exact routing. Returns y [B, T, D], the layer's statistics and its routing."""
    slot_of = self.slot_of[...]
    exact = self.routing == "exact"
    if exact and bank is None:
      raise ValueError("exact routing needs the host expert bank")
    routing, probs = self.route(x)
    stats = router_lib.layer_stats(x, probs, routing, slot_of, self.norms[...], token_mask)
    bsz, t, d = x.shape
    act = activation(self.act_name)
    flat_x = x.reshape(-1, d)
    slot = routing.slot.reshape(-1)
    hit = slot >= 0
    ffn, ffn_misses = experts_lib.expert_ffn, experts_lib.expert_ffn_misses
    if self.expert_mesh is not None:
      ffn, ffn_misses = parallel.expert_parallel(self.expert_mesh)
    y = ffn(flat_x, jnp.maximum(slot, 0), self.wi[...], self.wo[...], act, keep=routing.keep.reshape(-1) & hit,
            capacity=experts_lib.dispatch_capacity(bsz * t, bsz, self.capacity))
    if exact:
      y_miss = ffn_misses(flat_x, routing.chosen.reshape(-1), ~hit, bank[0], bank[1], act)
      y = jnp.where(hit[:, None], y, y_miss)
    scale = (routing.gate * routing.keep).reshape(-1, 1).astype(x.dtype)
    y = (y * scale).astype(x.dtype).reshape(bsz, t, d)
    return y, stats, routing
