"""Switch Transformers (Hugging Face `SwitchTransformersForConditionalGeneration`): config, layers, model."""

from swapmoe_jax.models.switch.config import ConfigError, SwitchConfig
from swapmoe_jax.models.switch.model import SwitchTransformer

__all__ = ["ConfigError", "SwitchConfig", "SwitchTransformer"]
