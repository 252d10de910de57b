"""Qwen2-MoE (HF Qwen2MoeForCausalLM): config reading; the model is `models.decoder.CausalMoE`."""

from swapmoe_jax.models.qwen2_moe.config import config_from_hf

__all__ = ["config_from_hf"]
