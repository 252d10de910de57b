"""OLMoE (HF `OlmoeForCausalLM`, `OlmoeConfig`): config.json -> `DecoderConfig`.

RMSNorm over the whole q and k projections (H*C and G*C) before the head split ("full" q/k norm), then
the optional `clip_qkv` clamp; `attention_bias` on q, k, v and o; every block sparse; no sliding window.
"""

from __future__ import annotations

from typing import Any

from swapmoe_jax.models.decoder.config import ConfigError, DecoderConfig, hf_get, hf_num_experts, hf_rope, hf_tokens


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
  num_layers = int(hf_get(hf, "num_hidden_layers", 16))
  hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or hidden // heads)
  if head_dim * heads != hidden:
    # HF's q_norm is RMSNorm(hidden_size) over the H*C query projection: they must agree.
    raise ConfigError(f"olmoe needs head_dim * num_attention_heads == hidden_size, "
                      f"got {head_dim} * {heads} != {hidden}")
  theta, scaling = hf_rope(hf, default_theta=10000.0)
  bias = bool(hf_get(hf, "attention_bias", False))
  clip = hf.get("clip_qkv")
  return DecoderConfig(
      model_type="olmoe",
      vocab_size=int(hf_get(hf, "vocab_size", 50304)),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(hf_get(hf, "num_key_value_heads", heads)),
      head_dim=head_dim,
      num_experts=hf_num_experts(hf, 64),
      top_k=int(hf_get(hf, "num_experts_per_tok", 8)),
      norm_topk_prob=bool(hf_get(hf, "norm_topk_prob", False)),
      moe_d_ff=int(hf_get(hf, "intermediate_size", 2048)),
      sparse_layers=tuple(range(num_layers)),
      rms_norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-5)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf_get(hf, "max_position_embeddings", 4096)),
      qk_norm="full",
      attention_bias=bias,
      output_bias=bias,
      clip_qkv=None if clip is None else float(clip),
      tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", False)),
      hidden_act=str(hf_get(hf, "hidden_act", "silu")),
      **hf_tokens(hf, bos=None, eos=50279, pad=1),
  )
