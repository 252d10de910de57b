"""The Switch Transformer encoder-decoder as Flax NNX modules, with Hugging Face semantics.

The modules hold weights; caches and host expert banks are explicit arguments, so the jitted
functions in `serving/decode.py` are pure functions of (state, caches, inputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.models.switch.layers import Attention, DenseFFN, RMSNorm, attend, position_bias
from swapmoe_jax.moe import VirtualExpertMoE
from swapmoe_jax.moe import router as router_lib

Banks = tuple | None  # per MoE layer (in config.moe_layers order): (wi [E,D,F], wo [E,F,D]) or None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
  """Decoder caches. self_k/self_v: per decoder block [B, H, T, C]; cross_k/cross_v: [B, H, S, C]."""

  self_k: tuple
  self_v: tuple
  cross_k: tuple
  cross_v: tuple
  enc_mask: jax.Array  # bool [B, S]


class Block(nnx.Module):
  """One encoder or decoder block: self-attention, (cross-attention), dense or sparse FFN."""

  def __init__(self, cfg: SwitchConfig, *, decoder: bool, sparse: bool, num_slots: int, routing, gate_mode, dtype, rngs):
    eps = cfg.layer_norm_epsilon
    self.attn_norm = RMSNorm(cfg.d_model, eps, dtype)
    self.attn = Attention(cfg, dtype, rngs)
    if decoder:
      self.cross_norm = RMSNorm(cfg.d_model, eps, dtype)
      self.cross = Attention(cfg, dtype, rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps, dtype)
    self.sparse = sparse
    if sparse:
      self.moe = VirtualExpertMoE(
          cfg.d_model, cfg.d_ff, cfg.num_experts, num_slots, cfg.expert_capacity, act=cfg.dense_act_fn,
          router_bias=cfg.router_bias, routing=routing, gate_mode=gate_mode, dtype=dtype, rngs=rngs,
      )
    else:
      self.mlp = DenseFFN(cfg, dtype, rngs)

  def ffn(self, x, token_mask, bank):
    h = self.ffn_norm(x)
    if self.sparse:
      y, stats, _ = self.moe(h, token_mask, bank)
      return x + y, stats
    return x + self.mlp(h), None


class Stack(nnx.Module):
  def __init__(self, cfg: SwitchConfig, *, decoder: bool, slots: dict[int, int], routing, gate_mode, dtype, rngs):
    n = cfg.num_decoder_layers if decoder else cfg.num_layers
    sparse = set(cfg.decoder_sparse_layers if decoder else cfg.encoder_sparse_layers)
    self.rel_bias = nnx.Param(nnx.initializers.normal(cfg.d_model**-0.5)(
        rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), dtype))
    self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
    if not cfg.tie_word_embeddings:
      # transformers 5 unties the stacks' token embeddings from `shared` together with the LM head.
      self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model), dtype))
    self.blocks = nnx.List([
        Block(cfg, decoder=decoder, sparse=i in sparse, num_slots=slots.get(i, cfg.num_experts),
              routing=routing, gate_mode=gate_mode, dtype=dtype, rngs=rngs)
        for i in range(n)
    ])


class SwitchTransformer(nnx.Module):
  """Switch Transformer with virtual-expert MoE layers.

  Args:
    cfg: the model configuration.
    slots_per_layer: K per MoE layer in `cfg.moe_layers` order (default: E everywhere, full residency).
    routing: "masked", "exact", "selective" or "fallback" (see `VirtualExpertMoE`).
    gate_mode: "original" or "renormalized".
    dtype: weight and activation dtype (routers are float32).
  """

  def __init__(self, cfg: SwitchConfig, *, slots_per_layer=None, routing="masked", gate_mode="original",
               dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    slots_per_layer = tuple(slots_per_layer or [cfg.num_experts] * cfg.num_moe_layers)
    if len(slots_per_layer) != cfg.num_moe_layers:
      raise ValueError(f"slots_per_layer has {len(slots_per_layer)} entries for {cfg.num_moe_layers} MoE layers")
    enc = {i: k for (s, i), k in zip(cfg.moe_layers, slots_per_layer) if s == "encoder"}
    dec = {i: k for (s, i), k in zip(cfg.moe_layers, slots_per_layer) if s == "decoder"}
    self.cfg = cfg
    if cfg.tie_word_embeddings:
      self.shared = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model), dtype))
    else:
      self.lm_head = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.d_model, cfg.vocab_size), dtype))
    self.encoder = Stack(cfg, decoder=False, slots=enc, routing=routing, gate_mode=gate_mode, dtype=dtype, rngs=rngs)
    self.decoder = Stack(cfg, decoder=True, slots=dec, routing=routing, gate_mode=gate_mode, dtype=dtype, rngs=rngs)

  # --- helpers ---------------------------------------------------------------------------
  def _bank(self, banks, stack: str, i: int):
    if banks is None or (stack, i) not in self.cfg.moe_layers:
      return None
    return banks[self.cfg.moe_layers.index((stack, i))]

  def _bias(self, stack: Stack, query_pos, key_len, bidirectional):
    c = self.cfg
    return position_bias(stack.rel_bias[...], query_pos, key_len, bidirectional=bidirectional,
                         num_buckets=c.relative_attention_num_buckets, max_distance=c.relative_attention_max_distance)

  def embed(self, stack: Stack, ids: jax.Array) -> jax.Array:
    table = self.shared[...] if self.cfg.tie_word_embeddings else stack.embed[...]
    return table[ids]

  def logits(self, h: jax.Array) -> jax.Array:
    """Final decoder hidden states [..., D] -> float32 logits [..., V]."""
    if self.cfg.tie_word_embeddings:
      h = h * (self.cfg.d_model**-0.5)  # HF: rescale before the tied LM head (Mesh TF)
      out = h @ self.shared[...].T
    else:
      out = h @ self.lm_head[...]
    return out.astype(jnp.float32)

  # --- encoder ---------------------------------------------------------------------------
  def encode(self, input_ids: jax.Array, mask: jax.Array, banks: Banks = None):
    """input_ids: int32[B, S]; mask: bool[B, S]. Returns hidden [B, S, D] and stacked encoder LayerStats."""
    x = self.embed(self.encoder, input_ids)
    s = input_ids.shape[1]
    bias = self._bias(self.encoder, jnp.arange(s, dtype=jnp.int32), s, True)
    attn_mask = mask[:, None, None, :]
    stats = []
    for i, blk in enumerate(self.encoder.blocks):
      h = blk.attn_norm(x)
      q = blk.attn.project_q(h)
      k, v = blk.attn.project_kv(h)
      x = x + blk.attn.output(attend(q, k, v, bias, attn_mask))
      x, st = blk.ffn(x, mask, self._bank(banks, "encoder", i))
      if st is not None:
        stats.append(st)
    return self.encoder.final_norm(x), router_lib.stack_stats(stats)

  # --- decoder ---------------------------------------------------------------------------
  def _decoder_blocks(self, x, self_kv_fn, bias, self_mask, cross_kv, enc_mask, token_mask, banks):
    stats, new_kv = [], []
    zero_bias = jnp.zeros((1,), x.dtype)[:, None, None, None]
    for i, blk in enumerate(self.decoder.blocks):
      h = blk.attn_norm(x)
      q = blk.attn.project_q(h)
      k, v = self_kv_fn(i, *blk.attn.project_kv(h))
      new_kv.append((k, v))
      x = x + blk.attn.output(attend(q, k, v, bias, self_mask))
      h = blk.cross_norm(x)
      ck, cv = cross_kv[i]
      x = x + blk.cross.output(attend(blk.cross.project_q(h), ck, cv, zero_bias, enc_mask[:, None, None, :]))
      x, st = blk.ffn(x, token_mask, self._bank(banks, "decoder", i))
      if st is not None:
        stats.append(st)
    return self.decoder.final_norm(x), new_kv, router_lib.stack_stats(stats)

  def cross_kv(self, enc_h: jax.Array) -> list:
    return [blk.cross.project_kv(enc_h) for blk in self.decoder.blocks]

  def decode_full(self, decoder_input_ids, enc_h, enc_mask, decoder_mask=None, banks: Banks = None):
    """Teacher-forced decoder pass. decoder_input_ids: int32[B, T]. Returns float32 logits [B, T, V], stats."""
    x = self.embed(self.decoder, decoder_input_ids)
    t = decoder_input_ids.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)
    bias = self._bias(self.decoder, pos, t, False)
    causal = pos[None, :] <= pos[:, None]  # [T, T]
    self_mask = causal[None, None]
    if decoder_mask is not None:
      self_mask = self_mask & decoder_mask[:, None, None, :].astype(bool)
    h, _, stats = self._decoder_blocks(
        x, lambda i, k, v: (k, v), bias, self_mask, self.cross_kv(enc_h), enc_mask, decoder_mask, banks)
    return self.logits(h), stats

  def init_cache(self, enc_h: jax.Array, enc_mask: jax.Array, max_len: int) -> DecodeCache:
    b = enc_h.shape[0]
    shape = (b, self.cfg.num_heads, max_len, self.cfg.d_kv)
    n = self.cfg.num_decoder_layers
    zeros = tuple(jnp.zeros(shape, enc_h.dtype) for _ in range(n))
    ckv = self.cross_kv(enc_h)
    return DecodeCache(self_k=zeros, self_v=tuple(jnp.zeros(shape, enc_h.dtype) for _ in range(n)),
                       cross_k=tuple(k for k, _ in ckv), cross_v=tuple(v for _, v in ckv), enc_mask=enc_mask)

  def decode_step(self, tokens: jax.Array, pos: jax.Array, cache: DecodeCache, banks: Banks = None,
                  live: jax.Array | None = None):
    """One decoder position for every row. tokens: int32[B]; pos: int32[] (the tokens' position);
    live: optional bool[B], False for rows that have finished: their tokens are left out of the
    routing statistics (their outputs are discarded anyway).

    Returns float32 logits [B, V], the updated cache and stacked decoder LayerStats.
    """
    x = self.embed(self.decoder, tokens)[:, None, :]  # [B, 1, D]
    max_len = cache.self_k[0].shape[2]
    bias = self._bias(self.decoder, pos[None].astype(jnp.int32), max_len, False)
    self_mask = (jnp.arange(max_len) <= pos)[None, None, None, :]

    def self_kv(i, k, v):
      k = jax.lax.dynamic_update_slice_in_dim(cache.self_k[i], k.astype(cache.self_k[i].dtype), pos, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache.self_v[i], v.astype(cache.self_v[i].dtype), pos, axis=2)
      return k, v

    cross = list(zip(cache.cross_k, cache.cross_v))
    token_mask = None if live is None else live[:, None]
    h, new_kv, stats = self._decoder_blocks(x, self_kv, bias, self_mask, cross, cache.enc_mask, token_mask, banks)
    cache = dataclasses.replace(cache, self_k=tuple(k for k, _ in new_kv), self_v=tuple(v for _, v in new_kv))
    return self.logits(h[:, 0]), cache, stats
