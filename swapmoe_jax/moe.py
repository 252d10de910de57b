"""The virtual-expert MoE layer: a Flax NNX module usable in any JAX model.

The router (always resident) scores all E experts; expert weights come from a fixed-shape slot buffer
`wi: [K, D, F]`, `wo: [K, F, D]` and an index map `slot_of: int32[E]` (slot, or -1). Slots and map are
`ExpertSlots` / `SlotIndex` variables: split them out with `nnx.split` and pass them to jitted functions
as arguments, so that swapping experts changes values, never shapes, and never recompiles.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from swapmoe_jax import experts as experts_lib
from swapmoe_jax import router as router_lib
from swapmoe_jax.layers import activation

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
  bank's E) over devices; set by `sharding.mark_expert_parallel` before `nnx.split`.
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
    self.wi = ExpertSlots(init(rngs.params(), (num_slots, d_model, d_ff), dtype))
    self.wo = ExpertSlots(init(rngs.params(), (num_slots, d_ff, d_model), dtype))
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

  def __call__(
      self,
      x: jax.Array,
      token_mask: jax.Array | None = None,
      bank: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, router_lib.LayerStats, router_lib.Routing]:
    """x: [B, T, D]; token_mask: bool [B, T] (statistics only); bank: (wi [E, D, F], wo [E, F, D]) in host
    memory, required for exact routing. Returns y [B, T, D], the layer's statistics and its routing."""
    slot_of = self.slot_of[...]
    exact = self.routing == "exact"
    if exact and bank is None:
      raise ValueError("exact routing needs the host expert bank")
    b = None if self.router_b is None else self.router_b[...]
    routing, probs = router_lib.route(
        x, self.router_w[...], b, slot_of, self.capacity, exact=exact, gate_mode=self.gate_mode
    )
    stats = router_lib.layer_stats(x, probs, routing, slot_of, self.norms[...], token_mask)
    bsz, t, d = x.shape
    act = activation(self.act_name)
    flat_x = x.reshape(-1, d)
    slot = routing.slot.reshape(-1)
    hit = slot >= 0
    ffn, ffn_misses = experts_lib.expert_ffn, experts_lib.expert_ffn_misses
    if self.expert_mesh is not None:
      from swapmoe_jax import sharding

      ffn, ffn_misses = sharding.expert_parallel(self.expert_mesh)
    y = ffn(flat_x, jnp.maximum(slot, 0), self.wi[...], self.wo[...], act, keep=routing.keep.reshape(-1) & hit,
            capacity=experts_lib.dispatch_capacity(bsz * t, bsz, self.capacity))
    if exact:
      y_miss = ffn_misses(flat_x, routing.chosen.reshape(-1), ~hit, bank[0], bank[1], act)
      y = jnp.where(hit[:, None], y, y_miss)
    scale = (routing.gate * routing.keep).reshape(-1, 1).astype(x.dtype)
    y = (y * scale).astype(x.dtype).reshape(bsz, t, d)
    return y, stats, routing
