"""Decoder-only MoE transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the shared config, layers and model.

Each family's package (`models/mixtral`, ...) reads its HF config.json; `DecoderConfig.from_hf_dict`
dispatches on `model_type`.
"""

from swapmoe_jax.models.decoder.config import ConfigError, DecoderConfig, SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES
from swapmoe_jax.models.decoder.model import CausalMoE, KVCache, params_from_dense

__all__ = ["CausalMoE", "ConfigError", "DecoderConfig", "KVCache", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES",
           "params_from_dense"]
