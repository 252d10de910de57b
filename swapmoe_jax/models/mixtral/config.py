"""Mixtral (HF `MixtralForCausalLM`, `MixtralConfig`): config.json -> `DecoderConfig`.

Every block is sparse; the router always renormalises its top-k probabilities (`MixtralTopKRouter`);
no attention bias, no q/k norm; `sliding_window` (when set) applies to every block.
"""

from __future__ import annotations

from typing import Any

from swapmoe_jax.models.decoder.config import DecoderConfig, hf_get, hf_head_dim, hf_num_experts, hf_rope, hf_tokens


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
  num_layers = int(hf_get(hf, "num_hidden_layers", 32))
  theta, scaling = hf_rope(hf, default_theta=1e6)
  window = hf.get("sliding_window")
  return DecoderConfig(
      model_type="mixtral",
      vocab_size=int(hf_get(hf, "vocab_size", 32000)),
      hidden_size=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf_get(hf, "num_key_value_heads", hf["num_attention_heads"])),
      head_dim=hf_head_dim(hf),
      num_experts=hf_num_experts(hf, 8),
      top_k=int(hf_get(hf, "num_experts_per_tok", 2)),
      norm_topk_prob=True,
      moe_d_ff=int(hf["intermediate_size"]),
      sparse_layers=tuple(range(num_layers)),
      rms_norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-5)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf_get(hf, "max_position_embeddings", 4096 * 32)),
      sliding_window=None if window is None else int(window),
      sliding_layers=() if window is None else tuple(range(num_layers)),
      tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", False)),
      hidden_act=str(hf_get(hf, "hidden_act", "silu")),
      **hf_tokens(hf, bos=1, eos=2, pad=None),
  )
