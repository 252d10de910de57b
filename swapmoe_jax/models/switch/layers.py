"""Dense building blocks of the Switch Transformer, with Hugging Face's numerics.

Sources: transformers 5 `modeling_switch_transformers.py` (T5 RMS norm with float32 variance; attention
without 1/sqrt(d) scaling; relative position bias from block 0, shared by all blocks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.models.linear import linear
from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.moe.activations import activation

_NEG = -1e30  # added to masked attention scores; finite so fully masked rows stay NaN-free


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """T5 RMS norm: variance in float32, no mean, no bias. x: [..., D]."""
  var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  y = x * jax.lax.rsqrt(var + eps)
  if weight.dtype in (jnp.bfloat16, jnp.float16):
    y = y.astype(weight.dtype)
  return weight * y


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32[2*max_distance+1]: bucket of relative position r = key - query, indexed by r + max_distance.

  Computed with numpy in float32 exactly as HF's `_relative_position_bucket` (torch, float32), so that
  bucket boundaries agree bit for bit. Every |r| >= max_distance falls into the last bucket of its side,
  so clipping r to [-max_distance, max_distance] before the lookup is exact.
  """
  rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = np.log(rel.astype(np.float32) / np.float32(max_exact))
  large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)  # where: avoid casting -inf
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(is_small, rel, large)
  return buckets.astype(np.int32)


def position_bias(
    table: jax.Array,
    query_pos: jax.Array,
    key_len: int,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> jax.Array:
  """<f>[1, H, Q, K] relative position bias. table: [NB, H]; query_pos: int32[Q] absolute positions."""
  lut = jnp.asarray(relative_position_buckets(bidirectional, num_buckets, max_distance))
  rel = jnp.arange(key_len, dtype=jnp.int32)[None, :] - query_pos[:, None]  # [Q, K]
  idx = jnp.clip(rel, -max_distance, max_distance) + max_distance
  bias = table[lut[idx]]  # [Q, K, H]
  return jnp.transpose(bias, (2, 0, 1))[None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
  """Unscaled dot-product attention (HF: scaling = 1.0).

  q: [B, H, Q, C]; k, v: [B, H, K, C]; bias: [1|B, H, Q, K]; mask: bool [B|1, 1, Q|1, K] (True = attend).
  Returns [B, Q, H*C].
  """
  scores = jnp.einsum("bhqc,bhkc->bhqk", q, k).astype(jnp.float32) + bias.astype(jnp.float32)
  scores = jnp.where(mask, scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bhkc->bqhc", probs, v)
  return out.reshape(out.shape[0], out.shape[1], -1)


class Attention(nnx.Module):
  """Multi-head attention projections in torch's [out, in] orientation: q, k, v: [H*C, D], o: [D, H*C]
  (the checkpoint's [in, out] matrices transposed at load, `loader.nnx_tree_from_dense`)."""

  def __init__(self, cfg: SwitchConfig, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.d_model**-0.5)
    d, inner = cfg.d_model, cfg.inner_dim
    self.q = nnx.Param(init(rngs.params(), (inner, d), dtype))
    self.k = nnx.Param(init(rngs.params(), (inner, d), dtype))
    self.v = nnx.Param(init(rngs.params(), (inner, d), dtype))
    self.o = nnx.Param(init(rngs.params(), (d, inner), dtype))
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.d_kv

  def _heads(self, x: jax.Array) -> jax.Array:
    """[B, N, H*C] -> [B, H, N, C]."""
    b, n, _ = x.shape
    return x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

  def project_q(self, x: jax.Array) -> jax.Array:
    return self._heads(linear(x, self.q[...]))

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._heads(linear(x, self.k[...])), self._heads(linear(x, self.v[...]))

  def output(self, attn: jax.Array) -> jax.Array:
    return linear(attn, self.o[...])


class DenseFFN(nnx.Module):
  """HF DenseActDense in torch's orientation: wi [F, D], act, wo [D, F]."""

  def __init__(self, cfg: SwitchConfig, dtype, rngs: nnx.Rngs):
    self.wi = nnx.Param(nnx.initializers.normal(cfg.d_model**-0.5)(rngs.params(), (cfg.d_ff, cfg.d_model), dtype))
    self.wo = nnx.Param(nnx.initializers.normal(cfg.d_ff**-0.5)(rngs.params(), (cfg.d_model, cfg.d_ff), dtype))
    self.act_name = cfg.dense_act_fn

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(activation(self.act_name)(linear(x, self.wi[...])), self.wo[...])
