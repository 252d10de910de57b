"""Qwen3-MoE (HF `Qwen3MoeForCausalLM`, `Qwen3MoeConfig`): config.json -> `DecoderConfig`.

RMSNorm(head_dim) on every query and key head before RoPE ("head" q/k norm); `attention_bias` puts a bias
on q, k, v and o; no shared expert; sparse blocks as Qwen2-MoE; `sliding_window` (when
`use_sliding_window`) applies to every block.
"""

from __future__ import annotations

from typing import Any

from swapmoe_jax.models.decoder.config import (DecoderConfig, hf_get, hf_head_dim, hf_num_experts, hf_rope,
                                               hf_tokens, qwen_sparse_layers)


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
  num_layers = int(hf_get(hf, "num_hidden_layers", 24))
  num_experts = hf_num_experts(hf, 128)
  theta, scaling = hf_rope(hf, default_theta=10000.0)
  window = int(hf_get(hf, "sliding_window", 4096)) if hf_get(hf, "use_sliding_window", False) else None
  bias = bool(hf_get(hf, "attention_bias", False))
  return DecoderConfig(
      model_type="qwen3_moe",
      vocab_size=int(hf_get(hf, "vocab_size", 151936)),
      hidden_size=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf_get(hf, "num_key_value_heads", 4)),
      head_dim=hf_head_dim(hf),
      num_experts=num_experts,
      top_k=int(hf_get(hf, "num_experts_per_tok", 8)),
      norm_topk_prob=bool(hf_get(hf, "norm_topk_prob", False)),
      moe_d_ff=int(hf_get(hf, "moe_intermediate_size", 768)),
      dense_d_ff=int(hf_get(hf, "intermediate_size", 6144)),
      sparse_layers=qwen_sparse_layers(hf, num_layers, num_experts),
      rms_norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf_get(hf, "max_position_embeddings", 32768)),
      qk_norm="head",
      attention_bias=bias,
      output_bias=bias,
      sliding_window=window,
      sliding_layers=() if window is None else tuple(range(num_layers)),
      tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", False)),
      hidden_act=str(hf_get(hf, "hidden_act", "silu")),
      **hf_tokens(hf, bos=None, eos=None, pad=None),
  )
