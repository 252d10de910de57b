"""Routing with masked gating (SwapMoE), plus routing statistics: top-1 with HF's capacity rule (Switch)
and top-k without capacity (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Top-1 (`route`), HF semantics (SwitchTransformersTop1Router): logits and softmax in float32, probabilities cast back to
the input dtype, argmax over those, gate = the chosen probability (not renormalised); per batch row, a
token whose cumulative count for its expert exceeds `expert_capacity` is dropped (its MoE output is 0).

SwapMoE (arXiv 2308.15030 §3): only resident experts serve. A token whose preferred expert is not
resident goes to its best resident expert ("masked gating"); the gate is either the original
probability of the served expert ("original") or the probability renormalised over the resident set
("renormalized"). Importance (Eq. 1) is measured on the *unmasked* choice, so a non-resident expert
can gain importance.

Top-k (`route_topk`), HF semantics (MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter,
OlmoeTopKRouter in transformers 5): softmax in float32 over all E experts, `torch.topk` of those
probabilities, with `norm_topk_prob` the k weights divided by their sum (in float32), then cast to the
input dtype (Mixtral always renormalises and keeps float32 weights; the cast only matters below float32).
Masked routing serves a token with its k best *resident* experts; the same two gate modes apply.

Selective routing (issue 16) sits between the two: a missing expert whose router probability (float32,
full softmax, before `norm_topk_prob`) is at least `threshold` is served exactly from the host bank,
one below it is redirected as masked routing redirects it. Both routers implement it as masked routing
over a per-token set of *available* experts, A(x) = resident ∪ {i: p_i(x) >= threshold}: a wanted
expert in A(x) is served as wanted (from its slot, or from the bank when it is not resident), one
outside A(x) gives way to the best resident expert the token does not already use. Threshold 0 makes
every expert available (exact routing); a threshold above 1 leaves only the resident ones (masked
routing). Top-k decides each token-choice pair on its own probability. The "renormalized" gate divides
by the token's total probability over A(x), the experts it may be served by (the resident set under
masked routing, every expert at threshold 0).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

GateMode = Literal["original", "renormalized"]
GATE_MODES = ("original", "renormalized")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Routing decisions for one MoE layer. Shapes: [B, T] for top-1, [B, T, k] for top-k (k > 1), one entry
  per token-choice pair, the k choices in decreasing order of probability."""

  wanted: jax.Array  # int32: the unmasked router's expert
  chosen: jax.Array  # int32: the expert that serves the token
  slot: jax.Array  # int32: resident slot of `chosen`, -1 when not resident (exact routing misses)
  gate: jax.Array  # <dtype>: weight of the expert output
  keep: jax.Array  # bool: False for tokens dropped by the capacity rule (top-k: for a non-resident choice, K < k)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Per-layer routing statistics, computed on the device. Shapes: [E] unless noted. With top-k routing
  the counts are of token-choice pairs, and importance sums over a token's k wanted experts."""

  importance: jax.Array  # float32: Σ_{x: wanted=i} ‖x‖·G(x)_i·‖E_i‖ (paper Eq. 1)
  wanted: jax.Array  # int32: tokens the unmasked router sends to each expert
  served: jax.Array  # int32: tokens computed by each expert (after masking and capacity)
  redirected: jax.Array  # int32 []: tokens served by another expert than wanted (top-k: not any wanted one)
  misses: jax.Array  # int32 []: tokens whose wanted expert was not resident
  # int32 []: tokens whose (non-resident) expert was computed from the host bank: every miss under exact
  # routing, the misses at or above the threshold under selective routing, none under masked routing.
  # Under fallback routing (routed as exact routing): every miss, computed from the expert's int8 copy.
  from_bank: jax.Array
  # int32 []: distinct non-resident experts that served tokens in this call: the expert weights it needs
  # from host memory under exact and selective routing (the least the step must read; its bytes are this
  # times an expert's), the int8 copies it uses under fallback routing.
  missed_experts: jax.Array


def stack_stats(stats: list) -> LayerStats | None:
  """Per-layer LayerStats of a stack's MoE layers -> one LayerStats with a leading layer axis (None if none)."""
  if not stats:
    return None
  return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def _distinct(experts: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
  """int32 []: how many distinct values `experts` takes where `mask` is True."""
  flags = jnp.zeros((num_experts,), bool).at[jnp.where(mask, experts, num_experts).reshape(-1)].set(True, mode="drop")
  return jnp.sum(flags).astype(jnp.int32)


def _logits_dot(x, w):
  # HIGHEST: XLA's default precision multiplies float32 in one bfloat16 pass on TPUs (and in TF32 on
  # recent NVIDIA GPUs), which flips near-tied routing decisions; HF routes in float32. On the CPU it
  # changes nothing; on an NVIDIA GPU `_logits_sum` is used instead (faster, as exact).
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _logits_sum(x, w):
  """The same float32 products summed over D by a reduction XLA fuses with the cast, no GEMM: on an
  H200 cuBLAS ran the HIGHEST-precision [N, D] x [D, E] product as a float32 FFMA kernel of 32 x 32
  tiles, 8 blocks for a 128-token switch-base prefill, 28 us a layer (0.17 ms of the prefill's 1.97 ms
  of kernels; benchmarks/RESULTS.md). Float32 throughout, as HIGHEST: only the summation order differs."""
  return jnp.sum(x.astype(jnp.float32)[..., :, None] * w.astype(jnp.float32), axis=-2)


# Router logits on NVIDIA GPUs as a reduction (`_logits_sum`); elsewhere as a HIGHEST-precision matmul.
ROUTER_SUM_ON_GPU = True


def _logits(x, w, b):
  if ROUTER_SUM_ON_GPU:
    logits = jax.lax.platform_dependent(x, w, cuda=_logits_sum, default=_logits_dot)
  else:
    logits = _logits_dot(x, w)
  return logits if b is None else logits + b.astype(jnp.float32)


def _available(resident, probs, threshold):
  """The experts that may serve each token: bool [E] (masked routing: the resident ones) or, with a
  selective `threshold` (float32 [], traced), bool [B, T, E]: resident, or probable enough to be read
  from the host bank. probs: float32 [B, T, E]."""
  return resident if threshold is None else resident | (probs >= threshold)


def route(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    slot_of: jax.Array,
    capacity: int,
    *,
    exact: bool,
    gate_mode: GateMode = "original",
    threshold: jax.Array | None = None,
) -> tuple[Routing, jax.Array]:
  """Routes tokens. x: [B, T, D]; w: [D, E]; b: [E] or None; slot_of: int32[E] (slot or -1);
  threshold: None, or float32 [] for selective routing (see the module docstring; exact=False).

  Capacity counts tokens by the expert that serves them, whatever its memory: a token served from the
  bank counts for its wanted expert (as under exact routing), a redirected one for the expert it is
  redirected to (as under masked routing).

  Returns the routing and the float32 router probabilities [B, T, E].
  """
  probs = jax.nn.softmax(_logits(x, w, b), axis=-1)  # float32 [B, T, E]
  probs_in = probs.astype(x.dtype)  # HF casts back to the input dtype before the argmax
  wanted = jnp.argmax(probs_in, axis=-1).astype(jnp.int32)
  resident = slot_of >= 0  # [E]
  available = _available(resident, probs, threshold)
  if exact:
    chosen = wanted
  else:
    masked = jnp.where(available, probs_in.astype(jnp.float32), -1.0)
    wanted_ok = resident[wanted]
    if threshold is not None:
      wanted_ok |= jnp.take_along_axis(probs, wanted[..., None], axis=-1)[..., 0] >= threshold
    # A served wanted expert is served as is: deriving both choices from one argmax keeps them equal
    # even where XLA keeps excess precision in one fusion and not the other (seen in bf16 on a GPU).
    chosen = jnp.where(wanted_ok, wanted, jnp.argmax(masked, axis=-1).astype(jnp.int32))
  if gate_mode == "original" or exact:
    gate = jnp.take_along_axis(probs_in, chosen[..., None], axis=-1)[..., 0]
  elif gate_mode == "renormalized":
    p = jnp.take_along_axis(probs, chosen[..., None], axis=-1)[..., 0]
    gate = (p / jnp.sum(jnp.where(available, probs, 0.0), axis=-1)).astype(x.dtype)
  else:
    raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
  # Capacity: cumulative count per batch row, in position order (HF token_priority).
  one_hot = jax.nn.one_hot(chosen, slot_of.shape[0], dtype=jnp.int32)  # [B, T, E]
  priority = jnp.take_along_axis(jnp.cumsum(one_hot, axis=1), chosen[..., None], axis=-1)[..., 0]
  keep = priority <= capacity
  slot = slot_of[chosen]
  return Routing(wanted=wanted, chosen=chosen, slot=slot, gate=gate, keep=keep), probs


def route_topk(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    slot_of: jax.Array,
    top_k: int,
    *,
    exact: bool,
    gate_mode: GateMode = "original",
    norm_topk_prob: bool = False,
    threshold: jax.Array | None = None,
) -> tuple[Routing, jax.Array]:
  """Top-k routing without capacity. x: [B, T, D]; w: [D, E]; b: [E] or None; slot_of: int32[E];
  threshold: None, or float32 [] for selective routing (see the module docstring; exact=False).

  Returns the routing, fields [B, T, k] (`keep` is all True except, in masked routing with fewer
  resident experts than k, for the non-resident choices, whose gate is 0), and the float32 router
  probabilities [B, T, E].

  Gates: exact routing and gate_mode "original" take the full-softmax probabilities of the chosen
  experts; "renormalized" divides them by the resident experts' total probability. With
  `norm_topk_prob` the k gates are then divided by their sum (over the served choices). All in float32,
  then cast to x.dtype (HF Qwen2MoeTopKRouter). Selective routing: `keep` is False for the choices
  outside A(x) (fewer than k available experts), and "renormalized" divides by A(x)'s probability.
  """
  if gate_mode not in GATE_MODES:
    raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
  probs = jax.nn.softmax(_logits(x, w, b), axis=-1)  # float32 [B, T, E]
  top_p, wanted = jax.lax.top_k(probs, top_k)  # [B, T, k], decreasing (torch.topk)
  wanted = wanted.astype(jnp.int32)
  resident = slot_of >= 0  # [E]
  if exact:
    chosen, p, keep = wanted, top_p, jnp.ones(wanted.shape, bool)
  else:
    available = _available(resident, probs, threshold)
    masked_p, masked = jax.lax.top_k(jnp.where(available, probs, -1.0), top_k)
    wanted_ok = resident[wanted] if threshold is None else resident[wanted] | (top_p >= threshold)
    # Tokens whose k wanted experts are all served keep exactly the unmasked choice (see `route`).
    same = jnp.all(wanted_ok, axis=-1, keepdims=True)
    chosen = jnp.where(same, wanted, masked.astype(jnp.int32))
    # False only when fewer than k experts are available
    keep = resident[chosen] if threshold is None else jnp.take_along_axis(available, chosen, axis=-1)
    p = jnp.where(keep, jnp.where(same, top_p, masked_p), 0.0)
    if gate_mode == "renormalized":
      p = p / jnp.sum(jnp.where(available, probs, 0.0), axis=-1, keepdims=True)
  if norm_topk_prob:
    p = p / jnp.sum(p, axis=-1, keepdims=True)
  routing = Routing(wanted=wanted, chosen=chosen, slot=slot_of[chosen], gate=p.astype(x.dtype), keep=keep)
  return routing, probs


def topk_layer_stats(
    x: jax.Array,
    probs: jax.Array,
    routing: Routing,
    slot_of: jax.Array,
    expert_norms: jax.Array,
    token_mask: jax.Array | None,
) -> LayerStats:
  """`layer_stats` over token-choice pairs. x: [B, T, D]; probs: float32 [B, T, E]; routing fields
  [B, T, k]; token_mask: bool [B, T]. A pair is redirected when its served expert is none of the
  token's wanted experts."""
  num_experts = probs.shape[-1]
  valid = jnp.ones(routing.wanted.shape[:2], bool) if token_mask is None else token_mask.astype(bool)
  x_norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))  # [B, T]
  wanted_1h = jnp.sum(jax.nn.one_hot(routing.wanted, num_experts, dtype=jnp.float32), axis=2) * valid[..., None]
  importance = jnp.einsum("bte,bt,bte->e", wanted_1h, x_norm, probs) * expert_norms.astype(jnp.float32)
  served = valid[..., None] & routing.keep  # [B, T, k]
  served_1h = jax.nn.one_hot(routing.chosen, num_experts, dtype=jnp.int32) * served[..., None]
  elsewhere = ~jnp.any(routing.chosen[..., :, None] == routing.wanted[..., None, :], axis=-1)  # [B, T, k]
  return LayerStats(
      importance=importance,
      wanted=jnp.sum(wanted_1h, axis=(0, 1)).astype(jnp.int32),
      served=jnp.sum(served_1h, axis=(0, 1, 2)),
      redirected=jnp.sum(served & elsewhere).astype(jnp.int32),
      misses=jnp.sum(valid[..., None] & (slot_of[routing.wanted] < 0)).astype(jnp.int32),
      from_bank=jnp.sum(served & (routing.slot < 0)).astype(jnp.int32),
      missed_experts=_distinct(routing.chosen, served & (routing.slot < 0), num_experts),
  )


def layer_stats(
    x: jax.Array,
    probs: jax.Array,
    routing: Routing,
    slot_of: jax.Array,
    expert_norms: jax.Array,
    token_mask: jax.Array | None,
) -> LayerStats:
  """Statistics of one layer's routing. x: [B, T, D]; probs: float32 [B, T, E]; token_mask: bool [B, T]."""
  num_experts = probs.shape[-1]
  valid = jnp.ones(routing.wanted.shape, bool) if token_mask is None else token_mask.astype(bool)
  x_norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))  # [B, T]
  wanted_1h = jax.nn.one_hot(routing.wanted, num_experts, dtype=jnp.float32) * valid[..., None]
  importance = jnp.einsum("bte,bt,bte->e", wanted_1h, x_norm, probs) * expert_norms.astype(jnp.float32)
  served_1h = jax.nn.one_hot(routing.chosen, num_experts, dtype=jnp.int32) * (valid & routing.keep)[..., None]
  return LayerStats(
      importance=importance,
      wanted=jnp.sum(wanted_1h, axis=(0, 1)).astype(jnp.int32),
      served=jnp.sum(served_1h, axis=(0, 1)),
      redirected=jnp.sum(valid & (routing.chosen != routing.wanted)).astype(jnp.int32),
      misses=jnp.sum(valid & (slot_of[routing.wanted] < 0)).astype(jnp.int32),
      # Capacity drops included, as in `misses`: exact routing reads them from the bank too.
      from_bank=jnp.sum(valid & (routing.slot < 0)).astype(jnp.int32),
      missed_experts=_distinct(routing.chosen, valid & (routing.slot < 0), num_experts),
  )
