"""Released Switch Transformer shapes (from their HF config.json files), for benchmarks with random weights.

Speed and memory do not depend on the weight values, so the benchmarks build these shapes with random
weights instead of downloading checkpoints.
"""

from swapmoe_jax.models.switch.config import SwitchConfig

_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
             num_decoder_layers=12, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64)
_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24,
              num_decoder_layers=24, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64)

SHAPES = {
    "switch-base-8": SwitchConfig(num_experts=8, **_BASE),
    "switch-base-16": SwitchConfig(num_experts=16, **_BASE),
    "switch-base-32": SwitchConfig(num_experts=32, **_BASE),
    "switch-base-64": SwitchConfig(num_experts=64, **_BASE),
    "switch-base-128": SwitchConfig(num_experts=128, **_BASE),
    "switch-large-128": SwitchConfig(num_experts=128, **_LARGE),
    "tiny": SwitchConfig(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=4,
                         num_decoder_layers=4, num_experts=16, encoder_sparse_step=2, decoder_sparse_step=2),
}
