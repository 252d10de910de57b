"""Qwen2-MoE (HF `Qwen2MoeForCausalLM`, `Qwen2MoeConfig`): config.json -> `DecoderConfig`.

q/k/v bias (`qkv_bias`, default True; o without bias); a shared expert gated by sigmoid(x @ gate) in every
sparse block; sparse blocks by `decoder_sparse_step` / `mlp_only_layers`, the others a dense SwiGLU of
`intermediate_size`; sliding window per block by `layer_types` (HF's default: even blocks below
`max_window_layers` when `use_sliding_window`).
"""

from __future__ import annotations

from typing import Any

from swapmoe_jax.models.decoder.config import (ConfigError, DecoderConfig, hf_get, hf_head_dim, hf_num_experts,
                                               hf_rope, hf_tokens, qwen_sparse_layers)


def sliding_layers(hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
  """Blocks with sliding-window attention (`Qwen2MoeConfig.__post_init__`'s `layer_types`)."""
  if not hf_get(hf, "use_sliding_window", False):
    return ()
  types = hf.get("layer_types")
  if types is None:
    max_window = int(hf_get(hf, "max_window_layers", 28))
    return tuple(i for i in range(num_layers) if (i + 1) % 2 and i < max_window)
  if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
    raise ConfigError(f"layer_types must be {num_layers} of 'sliding_attention' / 'full_attention', got {types}")
  return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
  num_layers = int(hf_get(hf, "num_hidden_layers", 24))
  num_experts = hf_num_experts(hf, 60)
  theta, scaling = hf_rope(hf, default_theta=10000.0)
  sliding = sliding_layers(hf, num_layers)
  shared = int(hf_get(hf, "shared_expert_intermediate_size", 5632))
  return DecoderConfig(
      model_type="qwen2_moe",
      vocab_size=int(hf_get(hf, "vocab_size", 151936)),
      hidden_size=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf_get(hf, "num_key_value_heads", hf["num_attention_heads"])),
      head_dim=hf_head_dim(hf),
      num_experts=num_experts,
      top_k=int(hf_get(hf, "num_experts_per_tok", 4)),
      norm_topk_prob=bool(hf_get(hf, "norm_topk_prob", False)),
      moe_d_ff=int(hf_get(hf, "moe_intermediate_size", 1408)),
      shared_d_ff=shared if shared > 0 else None,
      dense_d_ff=int(hf_get(hf, "intermediate_size", 5632)),
      sparse_layers=qwen_sparse_layers(hf, num_layers, num_experts),
      rms_norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf_get(hf, "max_position_embeddings", 32768)),
      attention_bias=bool(hf_get(hf, "qkv_bias", True)),
      sliding_window=int(hf_get(hf, "sliding_window", 4096)) if sliding else None,
      sliding_layers=sliding,
      tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", False)),
      hidden_act=str(hf_get(hf, "hidden_act", "silu")),
      **hf_tokens(hf, bos=None, eos=None, pad=None),
  )
