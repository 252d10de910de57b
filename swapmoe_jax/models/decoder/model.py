"""Decoder-only MoE transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as Flax NNX modules, with Hugging
Face semantics.

The modules hold weights; the KV cache and the host expert banks are explicit arguments, so the jitted
functions of the runtime are pure functions of (state, cache, inputs). Rows are left-padded: a row's
RoPE positions are `cumsum(mask) - 1` (HF `generate`'s position_ids), so that the token at cache index i
of a row with `offset` pads sits at position i - offset.

Axis letters: B batch, T positions, S prompt length, L cache positions, D model width, V vocab,
G kv heads, C head dim, E experts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.models.decoder.config import DecoderConfig
from swapmoe_jax.models.decoder.layers import (Attention, GatedMLP, RMSNorm, apply_rope, attend, attention_mask,
                                               rope_cos_sin, rope_frequencies)
from swapmoe_jax.moe import VirtualExpertMoE
from swapmoe_jax.moe import router as router_lib

Banks = tuple | None  # per MoE layer (cfg.moe_layers order): (wi [E, 2F, D], wo [E, D, F]) or None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Self-attention cache. k, v: per block [B, G, L, C] (after RoPE); valid: bool [B, L], True where a
  cache index holds a real token (False for left padding and unwritten positions); offset: int32 [B],
  each row's left-pad count (the RoPE position of cache index i is i - offset)."""

  k: tuple
  v: tuple
  valid: jax.Array
  offset: jax.Array


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)) (an MoE or a dense SwiGLU)."""

  def __init__(self, cfg: DecoderConfig, index: int, *, num_slots: int, routing, gate_mode, dtype, rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = Attention(cfg, dtype, rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.window = cfg.window_of(index)
    self.sparse = index in cfg.sparse_layers
    if self.sparse:
      self.moe = VirtualExpertMoE(
          cfg.hidden_size, cfg.moe_d_ff, cfg.num_experts, num_slots, None, act=cfg.hidden_act, routing=routing,
          gate_mode=gate_mode, dtype=dtype, rngs=rngs, top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
          expert_kind="glu", shared_d_ff=cfg.shared_d_ff,
      )
    else:
      self.mlp = GatedMLP(cfg.hidden_size, cfg.dense_d_ff, cfg.hidden_act, dtype, rngs)

  def ffn(self, x, token_mask, bank):
    h = self.ffn_norm(x)
    if self.sparse:
      y, stats, _ = self.moe(h, token_mask, bank)
      return x + y, stats
    return x + self.mlp(h), None


@functools.lru_cache(maxsize=None)
def _rope(cfg: DecoderConfig) -> tuple[np.ndarray, float]:
  return rope_frequencies(cfg)


def _heads_first(x: jax.Array) -> jax.Array:
  """[B, T, G, C] -> [B, G, T, C]."""
  return x.transpose(0, 2, 1, 3)


class CausalMoE(nnx.Module):
  """A decoder-only MoE language model with virtual-expert MoE layers.

  Args:
    cfg: the model configuration.
    slots_per_layer: K per MoE layer in `cfg.moe_layers` order (default: E everywhere, full residency).
    routing: "masked", "exact", "selective" or "fallback" (see `VirtualExpertMoE`).
    gate_mode: "original" or "renormalized".
    dtype: weight and activation dtype (routers are float32).
  """

  def __init__(self, cfg: DecoderConfig, *, slots_per_layer=None, routing="masked", gate_mode="original",
               dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    slots_per_layer = tuple(slots_per_layer or [cfg.num_experts] * cfg.num_moe_layers)
    if len(slots_per_layer) != cfg.num_moe_layers:
      raise ValueError(f"slots_per_layer has {len(slots_per_layer)} entries for {cfg.num_moe_layers} MoE layers")
    slots = dict(zip(cfg.decoder_sparse_layers, slots_per_layer))
    self.cfg = cfg
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (v, d), dtype))
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (d, v), dtype))
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
    self.blocks = nnx.List([
        Block(cfg, i, num_slots=slots.get(i, cfg.num_experts), routing=routing, gate_mode=gate_mode, dtype=dtype,
              rngs=rngs)
        for i in range(cfg.num_layers)
    ])

  # --- helpers ---------------------------------------------------------------------------
  def _bank(self, banks: Banks, i: int):
    if banks is None or i not in self.cfg.sparse_layers:
      return None
    return banks[self.cfg.decoder_sparse_layers.index(i)]

  def logits(self, h: jax.Array) -> jax.Array:
    """Final hidden states [..., D] (after the final norm) -> float32 logits [..., V]."""
    w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    return (h @ w).astype(jnp.float32)

  def _blocks(self, x, positions, kv_fn, q_index, key_valid, token_mask, banks):
    """Runs every block. x: [B, T, D]; positions: int32 [B, T] (RoPE); kv_fn(i, k, v) with k, v
    [B, G, T, C] -> the keys and values attended [B, G, L, C]; q_index: int32 [B|1, T] the queries' cache
    indices; key_valid: bool [B, L]. Returns the final-normed hidden states, the per-block (k, v) that
    kv_fn returned and stacked LayerStats."""
    inv_freq, scaling = _rope(self.cfg)
    cos, sin = rope_cos_sin(positions, inv_freq, scaling, x.dtype)
    scale = self.cfg.head_dim**-0.5
    masks = {}
    stats, new_kv = [], []
    for i, blk in enumerate(self.blocks):
      if blk.window not in masks:
        masks[blk.window] = attention_mask(q_index, key_valid, blk.window)
      q, k, v = blk.attn.project(blk.attn_norm(x))
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      k, v = kv_fn(i, _heads_first(k), _heads_first(v))
      new_kv.append((k, v))
      x = x + blk.attn.output(attend(q, k, v, masks[blk.window], scale))
      x, st = blk.ffn(x, token_mask, self._bank(banks, i))
      if st is not None:
        stats.append(st)
    return self.final_norm(x), new_kv, router_lib.stack_stats(stats)

  @staticmethod
  def positions(mask: jax.Array) -> jax.Array:
    """bool [B, T] -> int32 [B, T]: cumsum(mask) - 1, 0 on padding (HF `generate`'s position_ids)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    return jnp.where(mask, pos, 0).astype(jnp.int32)

  # --- the runtime interface -------------------------------------------------------------
  def forward(self, input_ids: jax.Array, mask: jax.Array, banks: Banks = None):
    """Full causal pass. input_ids: int32 [B, T]; mask: bool [B, T] (left padding allowed).

    Returns float32 logits [B, T, V] (meaningless at padded positions) and stacked LayerStats
    [L_moe, ...] (padding left out), or None without MoE layers.
    """
    mask = mask.astype(bool)
    x = self.embed[...][input_ids]
    t = input_ids.shape[1]
    h, _, stats = self._blocks(x, self.positions(mask), lambda i, k, v: (k, v),
                               jnp.arange(t, dtype=jnp.int32)[None], mask, mask, banks)
    return self.logits(h), stats

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` positions: k, v zeros [B, G, max_len, C] per block (in `dtype`, default
    the embedding's), valid all False, offset 0."""
    dtype = dtype or self.embed[...].dtype
    shape = (batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim)
    n = self.cfg.num_layers
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(n))  # noqa: E731
    return KVCache(k=zeros(), v=zeros(),
                   valid=jnp.zeros((batch, max_len), bool), offset=jnp.zeros((batch,), jnp.int32))

  def prefill(self, input_ids: jax.Array, mask: jax.Array, cache: KVCache, banks: Banks = None):
    """Runs the prompt and fills the cache at indices 0..S-1.

    input_ids: int32 [B, S]; mask: bool [B, S], left-padded so that index S-1 is every row's last token.
    Returns float32 logits of index S-1 [B, V], the cache (valid = mask there, offset = pad count) and
    stacked LayerStats.
    """
    mask = mask.astype(bool)
    s = input_ids.shape[1]
    x = self.embed[...][input_ids]

    def write(i, k, v):
      cache_k = jax.lax.dynamic_update_slice_in_dim(cache.k[i], k.astype(cache.k[i].dtype), 0, axis=2)
      cache_v = jax.lax.dynamic_update_slice_in_dim(cache.v[i], v.astype(cache.v[i].dtype), 0, axis=2)
      return (cache_k, cache_v), (k, v)

    written = []

    def kv_fn(i, k, v):
      full, local = write(i, k, v)
      written.append(full)
      return local  # the prompt attends to itself only: no need to read the whole cache

    h, _, stats = self._blocks(x, self.positions(mask), kv_fn, jnp.arange(s, dtype=jnp.int32)[None], mask, mask,
                               banks)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, 0, axis=1)
    offset = (s - jnp.sum(mask, axis=1)).astype(jnp.int32)
    cache = KVCache(k=tuple(k for k, _ in written), v=tuple(v for _, v in written), valid=valid, offset=offset)
    return self.logits(h[:, -1]), cache, stats

  def decode_step(self, tokens: jax.Array, pos: jax.Array, cache: KVCache, banks: Banks = None,
                  live: jax.Array | None = None):
    """One position for every row. tokens: int32 [B]; pos: int32 [] (the cache index written, >= S);
    live: optional bool [B], False for rows that have finished: their tokens are left out of the routing
    statistics (their outputs are discarded anyway). A row's RoPE position is pos - offset[row].

    Returns float32 logits [B, V], the updated cache and stacked LayerStats.
    """
    b = tokens.shape[0]
    x = self.embed[...][tokens][:, None, :]  # [B, 1, D]
    pos = jnp.asarray(pos, jnp.int32)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((b, 1), bool), pos, axis=1)

    def kv_fn(i, k, v):
      k = jax.lax.dynamic_update_slice_in_dim(cache.k[i], k.astype(cache.k[i].dtype), pos, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache.v[i], v.astype(cache.v[i].dtype), pos, axis=2)
      return k, v

    token_mask = None if live is None else live[:, None]
    h, new_kv, stats = self._blocks(x, (pos - cache.offset)[:, None], kv_fn, pos[None, None], valid, token_mask,
                                    banks)
    cache = KVCache(k=tuple(k for k, _ in new_kv), v=tuple(v for _, v in new_kv), valid=valid, offset=cache.offset)
    return self.logits(h[:, 0]), cache, stats


def _norm(w) -> dict:
  return {"weight": w}


def params_from_dense(cfg: DecoderConfig, dense: dict) -> dict:
  """The checkpoint's dense tree (matrices [in, out]) -> the pure dict of `CausalMoE`'s params, experts and
  expert norms excluded (those are slots, and the store's norms).

  dense: {"embed": [V, D], "lm_head": [D, V] (untied only), "final_norm": [D], "blocks": {"i": {"attn_norm",
  "attn": {"q", "k", "v", "o", optional "q_b", "k_b", "v_b", "o_b", "q_norm", "k_norm"}, "ffn_norm",
  "router": {"w": [D, E]} + optional "shared": {"wi": [D, 2Fs], "wo": [Fs, D], "gate": [D, 1]}, or
  "mlp": {"wi": [D, 2F], "wo": [F, D]}}}}. The matrices of attention, dense MLPs and the shared expert
  are transposed to the layers' [out, in] (`models/linear.py`).
  """
  out = {"embed": dense["embed"], "final_norm": _norm(dense["final_norm"])}
  if not cfg.tie_word_embeddings:
    out["lm_head"] = dense["lm_head"]
  blocks = {}
  for key, blk in dense["blocks"].items():
    i = int(key)
    attn = {name: np.asarray(blk["attn"][name]).T for name in ("q", "k", "v", "o")}
    if cfg.attention_bias:
      attn |= {name: blk["attn"][name] for name in ("q_b", "k_b", "v_b")}
    if cfg.output_bias:
      attn["o_b"] = blk["attn"]["o_b"]
    if cfg.qk_norm is not None:
      attn["q_norm"], attn["k_norm"] = _norm(blk["attn"]["q_norm"]), _norm(blk["attn"]["k_norm"])
    b = {"attn_norm": _norm(blk["attn_norm"]), "attn": attn, "ffn_norm": _norm(blk["ffn_norm"])}
    if i in cfg.sparse_layers:
      b["moe"] = {"router_w": np.asarray(blk["router"]["w"], np.float32)}
      if cfg.shared_d_ff is not None:
        shared = blk["shared"]
        b["moe"] |= {"shared_wi": np.asarray(shared["wi"]).T, "shared_wo": np.asarray(shared["wo"]).T,
                     "shared_gate": shared["gate"]}
    else:
      b["mlp"] = {"wi": np.asarray(blk["mlp"]["wi"]).T, "wo": np.asarray(blk["mlp"]["wo"]).T}
    blocks[i] = b
  missing = set(range(cfg.num_layers)) - set(blocks)
  if missing:
    raise KeyError(f"dense tree has no blocks {sorted(missing)}")
  out["blocks"] = blocks
  return out
