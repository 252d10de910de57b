"""Top-1 routing with masked gating (SwapMoE) and HF's capacity rule, plus routing statistics.

HF semantics (SwitchTransformersTop1Router): logits and softmax in float32, probabilities cast back to
the input dtype, argmax over those, gate = the chosen probability (not renormalised); per batch row, a
token whose cumulative count for its expert exceeds `expert_capacity` is dropped (its MoE output is 0).

SwapMoE (arXiv 2308.15030 §3): only resident experts serve. A token whose preferred expert is not
resident goes to its best resident expert ("masked gating"); the gate is either the original
probability of the served expert ("original") or the probability renormalised over the resident set
("renormalized"). Importance (Eq. 1) is measured on the *unmasked* choice, so a non-resident expert
can gain importance.
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
  """Routing decisions for one MoE layer. Shapes: [B, T] unless noted."""

  wanted: jax.Array  # int32: the unmasked router's expert
  chosen: jax.Array  # int32: the expert that serves the token
  slot: jax.Array  # int32: resident slot of `chosen`, -1 when not resident (exact routing misses)
  gate: jax.Array  # <dtype>: weight of the expert output
  keep: jax.Array  # bool: False for tokens dropped by the capacity rule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Per-layer routing statistics, computed on the device. Shapes: [E] unless noted."""

  importance: jax.Array  # float32: Σ_{x: wanted=i} ‖x‖·G(x)_i·‖E_i‖ (paper Eq. 1)
  wanted: jax.Array  # int32: tokens the unmasked router sends to each expert
  served: jax.Array  # int32: tokens computed by each expert (after masking and capacity)
  redirected: jax.Array  # int32 []: tokens served by another expert than wanted
  misses: jax.Array  # int32 []: tokens whose wanted expert was not resident


def route(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    slot_of: jax.Array,
    capacity: int,
    *,
    exact: bool,
    gate_mode: GateMode = "original",
) -> tuple[Routing, jax.Array]:
  """Routes tokens. x: [B, T, D]; w: [D, E]; b: [E] or None; slot_of: int32[E] (slot or -1).

  Returns the routing and the float32 router probabilities [B, T, E].
  """
  # HIGHEST: XLA's default precision multiplies float32 in one bfloat16 pass on TPUs (and in TF32 on
  # recent NVIDIA GPUs), which flips near-tied routing decisions; HF routes in float32. The router is
  # [D, E]: full precision costs nothing measurable. On the CPU it changes nothing.
  logits = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  if b is not None:
    logits = logits + b.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # float32 [B, T, E]
  probs_in = probs.astype(x.dtype)  # HF casts back to the input dtype before the argmax
  wanted = jnp.argmax(probs_in, axis=-1).astype(jnp.int32)
  resident = slot_of >= 0  # [E]
  if exact:
    chosen = wanted
  else:
    masked = jnp.where(resident, probs_in.astype(jnp.float32), -1.0)
    # A resident wanted expert is served as is: deriving both choices from one argmax keeps them equal
    # even where XLA keeps excess precision in one fusion and not the other (seen in bf16 on a GPU).
    chosen = jnp.where(resident[wanted], wanted, jnp.argmax(masked, axis=-1).astype(jnp.int32))
  if gate_mode == "original" or exact:
    gate = jnp.take_along_axis(probs_in, chosen[..., None], axis=-1)[..., 0]
  elif gate_mode == "renormalized":
    p = jnp.take_along_axis(probs, chosen[..., None], axis=-1)[..., 0]
    gate = (p / jnp.sum(jnp.where(resident, probs, 0.0), axis=-1)).astype(x.dtype)
  else:
    raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
  # Capacity: cumulative count per batch row, in position order (HF token_priority).
  one_hot = jax.nn.one_hot(chosen, slot_of.shape[0], dtype=jnp.int32)  # [B, T, E]
  priority = jnp.take_along_axis(jnp.cumsum(one_hot, axis=1), chosen[..., None], axis=-1)[..., 0]
  keep = priority <= capacity
  slot = slot_of[chosen]
  return Routing(wanted=wanted, chosen=chosen, slot=slot, gate=gate, keep=keep), probs


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
  )
