"""Converts Hugging Face SwitchTransformers checkpoints into swapmoe_jax's Orbax layout.

  python -m checkpoints_conv --hf google/switch-base-8 --out switch-base-8 [--dtype bfloat16]

or from Python: `checkpoints_conv.convert(hf_source, out_dir)`. The format is described in
`swapmoe_jax/checkpoint.py`; the HF name mapping is the table in `checkpoints_conv/rules.py`.
"""

from checkpoints_conv.convert import convert
from checkpoints_conv.errors import ConversionError
from checkpoints_conv.sources import resolve_source

__all__ = ["ConversionError", "convert", "resolve_source"]
