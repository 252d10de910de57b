"""OLMoE (HF OlmoeForCausalLM): config reading; the model is `models.decoder.CausalMoE`."""

from swapmoe_jax.models.olmoe.config import config_from_hf

__all__ = ["config_from_hf"]
