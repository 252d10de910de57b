"""Qwen3-MoE (HF Qwen3MoeForCausalLM): config reading; the model is `models.decoder.CausalMoE`."""

from swapmoe_jax.models.qwen3_moe.config import config_from_hf

__all__ = ["config_from_hf"]
