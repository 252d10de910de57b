"""The virtual-expert MoE layer: a Flax NNX module usable in any JAX model.

The router (always resident) scores all E experts; expert weights come from a fixed-shape slot buffer
`wi: [K, F, D]` (GLU experts: [K, 2F, D], gate rows then up rows), `wo: [K, D, F]` (torch Linear's
[out, in] per expert, see `experts.py`) and an index map `slot_of: int32[E]` (slot, or -1). Slots and map are
`ExpertSlots` / `SlotIndex` variables: split them out with `nnx.split` and pass them to jitted functions
as arguments, so that swapping experts changes values, never shapes, and never recompiles.
`place_experts` / `put_expert` fill and swap slots eagerly (for a model of one's own; the serving
engine swaps through `serving.executor.SwapExecutor`, in place, between jitted steps).

Selective routing keeps its threshold in a `SelectiveThreshold` variable (float32 []), a parameter
like the router's weights: it reaches the jitted step as a traced argument, so changing it (as swaps
change slots) never recompiles.

Fallback routing (HOBBIT, arXiv 2411.01433) keeps an int8 copy of every expert on the device
(`FallbackExperts` variables: wi_q int8 [E, F or 2F, D], wi_scale float32 [E, F or 2F], wo_q int8
[E, D, F], wo_scale float32 [E, D]; or int4 pairs packed in int8, wi_q [E, F or 2F, D / 2] and wo_q
[E, D, F / 2]: see `quant.py`): a token whose expert is not resident is computed with that copy instead
of being redirected. Routing, gates and capacity are exact routing's. The copies
go with the params (constant, arguments of every program, never captured).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.moe import experts as experts_lib
from swapmoe_jax.moe import parallel
from swapmoe_jax.moe import quant
from swapmoe_jax.moe import router as router_lib
from swapmoe_jax.moe.activations import expert_hidden

RoutingMode = Literal["masked", "exact", "selective", "fallback"]
ROUTINGS = ("masked", "exact", "selective", "fallback")
# Routings that read missing experts from the host bank passed to `__call__`.
BANK_ROUTINGS = ("exact", "selective")
ExpertKind = Literal["mlp", "glu"]
# A miss is read from the host bank when its router probability is at least this. 0.5 because a
# top-1 expert with more than half of the probability mass is one the token clearly prefers (every other
# expert has less), so redirecting it changes the output most; a token split between several
# experts loses less when redirected. For top-k models, whose probabilities are spread over k or more
# experts, a lower threshold (e.g. 1/(2k)) reads more misses from the bank.
DEFAULT_SELECTIVE_THRESHOLD = 0.5
# Above any probability: a selective layer with this threshold redirects every miss (masked routing).
NEVER_THRESHOLD = 2.0


class ExpertSlots(nnx.Variable):
  """Resident expert weights, [K, ...]: device memory that swaps overwrite in place."""


class SlotIndex(nnx.Variable):
  """int32[E]: the slot holding each expert, or -1."""


class ExpertNorms(nnx.Variable):
  """float32[E]: ‖E_i‖, constant per expert (computed at conversion), used by importance."""


class SelectiveThreshold(nnx.Variable):
  """float32 []: selective routing's threshold; a variable (not a static attribute) so that the jitted
  step takes it as an argument and a new value does not recompile."""


class FallbackExperts(nnx.Variable):
  """Fallback routing's int8 copies of all E experts and their float32 scales, [E, ...]: device memory,
  written once at load (`set_fallback`), read by the step for tokens whose expert is not resident."""


class VirtualExpertMoE(nnx.Module):
  """Top-1 (Switch) or top-k (Mixtral, Qwen2/3-MoE, OLMoE) MoE over K resident slots ("virtual
  experts", SwapMoE).

  Args:
    d_model, d_ff, num_experts: D, F, E.
    num_slots: K (1 <= K <= E).
    capacity: HF expert capacity per batch row (Switch, top_k == 1), or None: no token is dropped.
    act: activation name (HF ACT2FN).
    routing: "masked" (serve only resident experts; paper), "exact" (a missing expert is read from the
      host bank passed to `__call__`, so outputs equal the fully resident model) or "selective" (a
      missing expert whose router probability is >= `selective_threshold` is read from the bank, the
      others redirected as in masked routing; see `router.py`) or "fallback" (routed as exact routing; a
      missing expert is computed from its int8 copy on the device, the `FallbackExperts` variables,
      which `place_experts` and `set_fallback` fill; no bank).
    gate_mode: "original" or "renormalized" (masked and selective routing).
    selective_threshold: the initial value of the `SelectiveThreshold` variable (selective routing only;
      assign `layer.selective_threshold[...]` to change it).
    top_k: experts per token; k > 1 needs capacity=None (see `router.route_topk`).
    norm_topk_prob: divide the k gates by their sum (capacity=None only; HF's `norm_topk_prob`).
    expert_kind: "mlp" (y = wo·act(wi·x)) or "glu" (wi holds gate and up rows: y = wo·(act(g)·u)).
    shared_d_ff: Fs of an always-resident GLU shared expert (Qwen2-MoE), or None:
      y += sigmoid(x·shared_gate) · shared(x).

  With capacity=None the routing's fields are [B, T, k] for k > 1 and [B, T] for k == 1; the
  statistics stay [E] and count token-choice pairs.

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
      capacity: int | None,
      *,
      act: str = "relu",
      router_bias: bool = False,
      routing: RoutingMode = "masked",
      gate_mode: router_lib.GateMode = "original",
      dtype=jnp.float32,
      rngs: nnx.Rngs,
      top_k: int = 1,
      norm_topk_prob: bool = False,
      expert_kind: ExpertKind = "mlp",
      shared_d_ff: int | None = None,
      selective_threshold: float = DEFAULT_SELECTIVE_THRESHOLD,
  ):
    if not 1 <= num_slots <= num_experts:
      raise ValueError(f"num_slots must be in [1, {num_experts}], got {num_slots}")
    if routing not in ROUTINGS:
      raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if gate_mode not in router_lib.GATE_MODES:
      raise ValueError(f"gate_mode must be one of {router_lib.GATE_MODES}, got {gate_mode!r}")
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if capacity is not None and top_k != 1:
      raise ValueError(f"capacity applies to top-1 routing only; top_k={top_k} needs capacity=None")
    if capacity is not None and norm_topk_prob:
      raise ValueError("norm_topk_prob applies to capacity=None routing only")
    if expert_kind not in ("mlp", "glu"):
      raise ValueError(f"expert_kind must be 'mlp' or 'glu', got {expert_kind!r}")
    if shared_d_ff is not None and shared_d_ff < 1:
      raise ValueError(f"shared_d_ff must be a positive int or None, got {shared_d_ff}")
    self.router_w = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (d_model, num_experts), jnp.float32))
    self.router_b = nnx.Param(jnp.zeros((num_experts,), jnp.float32)) if router_bias else None
    init = nnx.initializers.normal(d_model**-0.5)
    rows = 2 * d_ff if expert_kind == "glu" else d_ff
    self.wi = ExpertSlots(init(rngs.params(), (num_slots, rows, d_model), dtype))
    self.wo = ExpertSlots(init(rngs.params(), (num_slots, d_model, d_ff), dtype))
    if routing == "fallback":  # zeros until `place_experts` / `set_fallback` (the loader fills them)
      self.wi_q = FallbackExperts(jnp.zeros((num_experts, rows, d_model), jnp.int8))
      self.wi_scale = FallbackExperts(jnp.zeros((num_experts, rows), jnp.float32))
      self.wo_q = FallbackExperts(jnp.zeros((num_experts, d_model, d_ff), jnp.int8))
      self.wo_scale = FallbackExperts(jnp.zeros((num_experts, d_model), jnp.float32))
    else:
      self.wi_q = self.wi_scale = self.wo_q = self.wo_scale = None
    slot_of = jnp.where(jnp.arange(num_experts) < num_slots, jnp.arange(num_experts), -1)
    self.slot_of = SlotIndex(slot_of.astype(jnp.int32))
    self.norms = ExpertNorms(jnp.ones((num_experts,), jnp.float32))
    self.selective_threshold = (SelectiveThreshold(jnp.asarray(selective_threshold, jnp.float32))
                                if routing == "selective" else None)
    if shared_d_ff is None:
      self.shared_wi = self.shared_wo = self.shared_gate = None
    else:
      self.shared_wi = nnx.Param(init(rngs.params(), (2 * shared_d_ff, d_model), dtype))
      shared_init = nnx.initializers.normal(shared_d_ff**-0.5)
      self.shared_wo = nnx.Param(shared_init(rngs.params(), (d_model, shared_d_ff), dtype))
      self.shared_gate = nnx.Param(init(rngs.params(), (d_model, 1), dtype))
    self.capacity = capacity
    self.act_name = act
    self.routing = routing
    self.gate_mode = gate_mode
    self.top_k = top_k
    self.norm_topk_prob = norm_topk_prob
    self.expert_kind = expert_kind

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
      wi, wo: every expert's weights in the slots' orientation (torch Linear's [out, in]), [E, F, D]
        ([E, 2F, D] for GLU experts) and [E, D, F] (numpy or jax arrays, any memory).
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
    if self.routing == "fallback":
      self.set_fallback(wi, wo)

  def set_fallback(self, wi, wo, bits: int = 8) -> None:
    """Fallback routing: quantizes every expert's weights (wi [E, F or 2F, D], wo [E, D, F], numpy or jax,
    any float dtype) to the int8 copies, or with `bits=4` to packed int4 pairs (`quant.quantize`: the
    variables' minor axis halves, which is how the step tells them apart), on the host. Eager; with
    `bits=4` the copies' shapes change, so a jitted step that takes them compiles once for the new
    shapes."""
    if self.routing != "fallback":
      raise ValueError(f"set_fallback applies to routing 'fallback', not {self.routing!r}")
    e = self.num_experts
    self._check_bank("wi", wi, (e,) + self.wi.shape[1:])
    self._check_bank("wo", wo, (e,) + self.wo.shape[1:])
    for (q_var, s_var), w in (((self.wi_q, self.wi_scale), wi), ((self.wo_q, self.wo_scale), wo)):
      q, scale = quant.quantize(w, bits)
      q_var.set_value(jnp.asarray(q))
      s_var[...] = jnp.asarray(scale)

  def put_expert(self, slot: int, expert: int, wi, wo) -> int:
    """Writes one expert's weights wi [F, D] ([2F, D] for GLU), wo [D, F] into `slot` and points the index map at it;
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
    threshold = None if self.selective_threshold is None else self.selective_threshold[...]
    if self.capacity is None:
      routing, probs = router_lib.route_topk(
          x, self.router_w[...], b, self.slot_of[...], self.top_k, exact=self.routing in ("exact", "fallback"),
          gate_mode=self.gate_mode, norm_topk_prob=self.norm_topk_prob, threshold=threshold)
      return (routing if self.top_k > 1 else jax.tree.map(lambda a: a[..., 0], routing)), probs
    return router_lib.route(x, self.router_w[...], b, self.slot_of[...], self.capacity,
                            exact=self.routing in ("exact", "fallback"), gate_mode=self.gate_mode, threshold=threshold)

  def __call__(
      self,
      x: jax.Array,
      token_mask: jax.Array | None = None,
      bank: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, router_lib.LayerStats, router_lib.Routing]:
    """x: [B, T, D]; token_mask: bool [B, T] (statistics only); bank: (wi [E, F or 2F, D], wo [E, D, F]) in
    host memory, required for exact and selective routing (fallback routing reads its own int8 copies).
    Returns y [B, T, D], the layer's statistics and its routing (`stats.from_bank` counts the tokens served
    from the bank, or from the int8 copies under fallback routing)."""
    if self.routing in BANK_ROUTINGS and bank is None:
      raise ValueError(f"{self.routing} routing needs the host expert bank")
    if self.capacity is None:
      y, stats, routing = self._topk(x, token_mask, bank)
    else:
      y, stats, routing = self._top1(x, token_mask, bank)
    if self.shared_wi is not None:
      y = y + self._shared(x)
    return y, stats, routing

  def _ffns(self, bank, decode: bool):
    """(ffn over the slots, misses(x, expert, miss, act) -> [N, D]: the non-resident experts' outputs).
    decode: the rows are one decode step's (one token per sequence), not a prefill's."""
    if self.expert_mesh is not None:
      ffn, ffn_misses = parallel.expert_parallel(self.expert_mesh)
      fallback = parallel.fallback_parallel(self.expert_mesh)
    else:
      ffn, ffn_misses = experts_lib.expert_ffn, experts_lib.expert_ffn_misses
      fallback = experts_lib.expert_ffn_fallback
    if self.routing == "fallback":  # the copies are split on E like the bank (`sharding.py`)
      copies = (self.wi_q[...], self.wi_scale[...], self.wo_q[...], self.wo_scale[...])
      return ffn, lambda x, expert, miss, act: fallback(x, expert, miss, copies, act)
    return ffn, lambda x, expert, miss, act: ffn_misses(x, expert, miss, bank[0], bank[1], act, decode)

  def _top1(self, x, token_mask, bank):
    """Switch: top-1 with HF's capacity rule; routing fields [B, T]. A token served from the bank (a
    miss under exact routing, a probable one under selective routing) or from its int8 copy (a miss
    under fallback routing) takes its expert's capacity as
    it would if resident; it is computed even when dropped, and zeroed with the dropped ones."""
    slot_of = self.slot_of[...]
    routing, probs = self.route(x)
    stats = router_lib.layer_stats(x, probs, routing, slot_of, self.norms[...], token_mask)
    bsz, t, d = x.shape
    act = expert_hidden(self.act_name, self.expert_kind)
    flat_x = x.reshape(-1, d)
    slot = routing.slot.reshape(-1)
    hit = slot >= 0
    ffn, ffn_misses = self._ffns(bank, decode=t == 1)
    y = ffn(flat_x, jnp.maximum(slot, 0), self.wi[...], self.wo[...], act, keep=routing.keep.reshape(-1) & hit,
            capacity=experts_lib.dispatch_capacity(bsz * t, bsz, self.capacity))
    if self.routing != "masked":
      y_miss = ffn_misses(flat_x, routing.chosen.reshape(-1), ~hit, act)
      y = jnp.where(hit[:, None], y, y_miss)
    scale = (routing.gate * routing.keep).reshape(-1, 1).astype(x.dtype)
    y = (y * scale).astype(x.dtype).reshape(bsz, t, d)
    return y, stats, routing

  def _topk(self, x, token_mask, bank):
    """Top-k without capacity over token-choice pairs: pair j of token n is row n·k + j."""
    slot_of = self.slot_of[...]
    routing, probs = self.route(x)
    k = self.top_k
    pairs = routing if k > 1 else jax.tree.map(lambda a: a[..., None], routing)  # [B, T, k]
    stats = router_lib.topk_layer_stats(x, probs, pairs, slot_of, self.norms[...], token_mask)
    bsz, t, d = x.shape
    n = bsz * t
    act = expert_hidden(self.act_name, self.expert_kind)
    flat_x = jnp.repeat(x.reshape(n, d), k, axis=0)  # [N k, D]
    slot = pairs.slot.reshape(-1)
    hit = slot >= 0
    ffn, ffn_misses = self._ffns(bank, decode=t == 1)
    # A token picks an expert at most once, so no slot gets more than N pairs: capacity N drops none.
    y = ffn(flat_x, jnp.maximum(slot, 0), self.wi[...], self.wo[...], act, keep=pairs.keep.reshape(-1) & hit,
            capacity=n)
    if self.routing != "masked":
      # `keep` is all True under exact routing; under selective routing it leaves out the choices that
      # had no available expert (fewer than k), whose gate is 0.
      miss = ~hit & pairs.keep.reshape(-1)
      y_miss = ffn_misses(flat_x, pairs.chosen.reshape(-1), miss, act)
      y = jnp.where(hit[:, None], y, y_miss)
    # HF: each expert's output times its weight in x.dtype, then summed over the k choices (here in float32).
    y = (y * (pairs.gate * pairs.keep).reshape(-1, 1).astype(x.dtype)).astype(x.dtype)
    y = jnp.sum(y.reshape(n, k, d).astype(jnp.float32), axis=1).astype(x.dtype)
    return y.reshape(bsz, t, d), stats, routing

  def _shared(self, x):
    """The shared expert (HF Qwen2MoeSparseMoeBlock): sigmoid(x·gate) · down(act(gate_proj x) · up_proj x).
    x: [B, T, D] -> [B, T, D]."""
    h = expert_hidden(self.act_name, "glu")(jnp.einsum("btd,fd->btf", x, self.shared_wi[...]))
    out = jnp.einsum("btf,df->btd", h, self.shared_wo[...])
    gate = jax.nn.sigmoid(jnp.einsum("btd,do->bto", x, self.shared_gate[...]))
    return (gate * out).astype(x.dtype)
