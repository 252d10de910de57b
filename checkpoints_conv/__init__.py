"""Converts Hugging Face MoE checkpoints into swapmoe_jax's Orbax layout: SwitchTransformers, and the
decoder-only Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

  python -m checkpoints_conv --hf google/switch-base-8 --out switch-base-8 [--dtype bfloat16]
  python -m checkpoints_conv --hf Qwen/Qwen1.5-MoE-A2.7B qwen-moe

or from Python: `checkpoints_conv.convert(hf_source, out_dir)`. The format is described in
`swapmoe_jax/checkpoint.py`; the HF name mappings are the tables in `checkpoints_conv/rules.py` (Switch) and
`checkpoints_conv/decoder_rules.py`.
"""

from checkpoints_conv.convert import convert
from checkpoints_conv.errors import ConversionError
from checkpoints_conv.sources import resolve_source

__all__ = ["ConversionError", "convert", "resolve_source"]
