"""The virtual-expert MoE layer, family-agnostic: the layer, its experts, its router, the expert-parallel
FFN and activations. Imports jax and flax only: no model family, no runtime."""

from swapmoe_jax.moe.layer import (ExpertNorms, ExpertSlots, FallbackExperts, RoutingMode, SelectiveThreshold,
                                   SlotIndex, VirtualExpertMoE)

__all__ = ["ExpertNorms", "ExpertSlots", "FallbackExperts", "RoutingMode", "SelectiveThreshold", "SlotIndex",
           "VirtualExpertMoE"]
