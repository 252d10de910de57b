"""Dense building blocks of the decoder-only MoE families, with Hugging Face's numerics.

Sources (transformers 5): `modeling_mixtral.py`, `modeling_qwen2_moe.py`, `modeling_qwen3_moe.py`,
`modeling_olmoe.py` and `modeling_rope_utils.py`: RMSNorm in float32 cast back before the weight; RoPE
with `rotate_half` on cos/sin computed in float32; grouped-query attention scaled by C**-0.5 with the
softmax in float32; SwiGLU MLP.

Axis letters: B batch, T query positions, L key (cache) positions, D model width, F FFN width, H query
heads, G kv heads, R query heads per kv head (H = G*R), C head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.models.decoder.config import DecoderConfig
from swapmoe_jax.models.linear import linear
from swapmoe_jax.moe.activations import activation

_NEG = -1e30  # added to masked attention scores; finite so fully masked rows (left padding) stay NaN-free


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """HF `MixtralRMSNorm`: variance in float32, normalised in float32, cast back to x's dtype, times weight."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return weight * (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)


# --- rotary position embedding --------------------------------------------------------------------


def rope_frequencies(cfg: DecoderConfig) -> tuple[np.ndarray, float]:
  """(float32[C/2] inverse frequencies, attention scaling of cos/sin) for the config's rope type.

  Computed in float32 as HF's `ROPE_INIT_FUNCTIONS` / `compute_default_rope_parameters` do with torch.
  Supported types: default, linear, llama3, yarn (see `config.SUPPORTED_ROPE_TYPES`).
  """
  dim, base = cfg.head_dim, cfg.rope_theta
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(base), exponent, dtype=np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  params = cfg.rope_params
  kind = "default" if params is None else params.get("rope_type", "default")
  if kind == "default":
    return inv_freq, 1.0
  if kind == "linear":
    return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0
  if kind == "llama3":
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  if kind == "yarn":
    return _yarn(params, dim, base, pos_freqs, cfg.max_position_embeddings)
  raise ValueError(f"unsupported rope type {kind!r}")  # DecoderConfig refuses these first


def _yarn(params: dict, dim: int, base: float, pos_freqs: np.ndarray, max_pos: int) -> tuple[np.ndarray, float]:
  """HF `_compute_yarn_parameters`."""
  orig = params["original_max_position_embeddings"]
  factor = params.get("factor") or max_pos / orig

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = params.get("attention_factor")
  if attention is None:
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
  beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

  def correction_dim(rotations):
    return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if params.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # HF: prevent a singularity
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)
  inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
  inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
  return inv_freq.astype(np.float32), float(attention)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scaling: float, dtype) -> tuple[jax.Array, jax.Array]:
  """positions: int32[B, T] -> cos, sin [B, T, C] in `dtype` (HF `RotaryEmbedding.forward`: float32 angles,
  the two halves repeated, times the attention scaling)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, C] (N heads); cos, sin: [B, T, C]. HF `apply_rotary_pos_emb` with `rotate_half`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- attention --------------------------------------------------------------------------------------


def attention_mask(q_index: jax.Array, key_valid: jax.Array, window: int | None) -> jax.Array:
  """bool [B, 1, 1, T, L]: query at cache index q_index [B|1, T] may attend key l when l <= q_index, the
  key is valid (key_valid: bool [B, L]) and, with a window, l > q_index - window (HF
  `sliding_window_overlay`, on cache indices: left padding shifts queries and keys alike)."""
  l = jnp.arange(key_valid.shape[1], dtype=jnp.int32)[None, None, :]
  q = q_index[:, :, None]
  mask = (l <= q) & key_valid[:, None, :]
  if window is not None:
    mask = mask & (l > q - window)
  return mask[:, None, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """Grouped-query attention, HF `eager_attention_forward` (scores * scale, softmax in float32, cast back).

  q: [B, T, H, C]; k, v: [B, G, L, C]; mask: bool [B, 1, 1, T, L]. Returns [B, T, H*C].
  """
  b, t, h, c = q.shape
  g = k.shape[1]
  qg = q.reshape(b, t, g, h // g, c)
  scores = jnp.einsum("btgrc,bglc->bgrtl", qg, k) * jnp.asarray(scale, q.dtype)
  scores = jnp.where(mask, scores.astype(jnp.float32), _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrtl,bglc->btgrc", probs, v)
  return out.reshape(b, t, h * c)


class Attention(nnx.Module):
  """Projections of grouped-query attention in torch's [out, in] orientation (`models/linear.py`):
  q [H*C, D], k, v [G*C, D], o [D, H*C]; optional q/k/v biases (`attention_bias`), o bias (`output_bias`) and q/k norms."""

  def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
    d, hc, gc = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    init = nnx.initializers.normal(d**-0.5)
    self.q = nnx.Param(init(rngs.params(), (hc, d), dtype))
    self.k = nnx.Param(init(rngs.params(), (gc, d), dtype))
    self.v = nnx.Param(init(rngs.params(), (gc, d), dtype))
    self.o = nnx.Param(nnx.initializers.normal(hc**-0.5)(rngs.params(), (d, hc), dtype))
    if cfg.attention_bias:
      self.q_b = nnx.Param(jnp.zeros((hc,), dtype))
      self.k_b = nnx.Param(jnp.zeros((gc,), dtype))
      self.v_b = nnx.Param(jnp.zeros((gc,), dtype))
    if cfg.output_bias:
      self.o_b = nnx.Param(jnp.zeros((d,), dtype))
    if cfg.qk_norm == "head":
      self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
    elif cfg.qk_norm == "full":
      self.q_norm = RMSNorm(hc, cfg.rms_norm_eps, dtype)
      self.k_norm = RMSNorm(gc, cfg.rms_norm_eps, dtype)
    self.qk_norm = cfg.qk_norm
    self.clip = cfg.clip_qkv
    self.bias = cfg.attention_bias
    self.out_bias = cfg.output_bias
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, T, D] -> q [B, T, H, C], k, v [B, T, G, C], before RoPE (the order of the HF attention
    forwards: projection (+ bias), "full" norm, clamp, head split, "head" norm)."""
    q, k, v = linear(x, self.q[...]), linear(x, self.k[...]), linear(x, self.v[...])
    if self.bias:
      q, k, v = q + self.q_b[...], k + self.k_b[...], v + self.v_b[...]
    if self.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    if self.clip is not None:
      q, k, v = (jnp.clip(a, -self.clip, self.clip) for a in (q, k, v))
    b, t, _ = x.shape
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def output(self, attn: jax.Array) -> jax.Array:
    """attn: [B, T, H*C] -> [B, T, D]."""
    y = linear(attn, self.o[...])
    return y + self.o_b[...] if self.out_bias else y


class GatedMLP(nnx.Module):
  """The dense SwiGLU MLP (HF `Qwen2MoeMLP`) in torch's orientation: wi [2F, D] = [gate; up], wo [D, F];
  y = (act(g) * u) wo^T."""

  def __init__(self, d_model: int, d_ff: int, act: str, dtype, rngs: nnx.Rngs):
    self.wi = nnx.Param(nnx.initializers.normal(d_model**-0.5)(rngs.params(), (2 * d_ff, d_model), dtype))
    self.wo = nnx.Param(nnx.initializers.normal(d_ff**-0.5)(rngs.params(), (d_model, d_ff), dtype))
    self.act_name = act

  def __call__(self, x: jax.Array) -> jax.Array:
    g, u = jnp.split(linear(x, self.wi[...]), 2, axis=-1)
    return linear(activation(self.act_name)(g) * u, self.wo[...])
