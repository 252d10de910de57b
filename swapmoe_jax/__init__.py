"""swapmoe_jax: serve Mixture-of-Experts models under a memory budget with SwapMoE virtual experts."""

from swapmoe_jax.config import ConfigError, SwitchConfig
from swapmoe_jax.engine import InputError, SwitchModel
from swapmoe_jax.loader import build_model, load
from swapmoe_jax.model import SwitchTransformer
from swapmoe_jax.moe import ExpertSlots, SlotIndex, VirtualExpertMoE
from swapmoe_jax.sampling import Sampling

__all__ = [
    "ConfigError", "InputError", "Sampling", "SlotIndex", "ExpertSlots", "SwitchConfig", "SwitchModel",
    "SwitchTransformer", "VirtualExpertMoE", "build_model", "load",
]
__version__ = "0.1.0"
