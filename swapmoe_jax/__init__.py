"""swapmoe_jax: serve Mixture-of-Experts models under a memory budget with SwapMoE virtual experts."""

import os as _os
import pkgutil as _pkgutil


def _gpu_plugin_installed() -> bool:
  """Whether a JAX GPU plugin (jax_cuda*_plugin, jax_rocm*_plugin) is importable and JAX_PLATFORMS, if
  set, allows a GPU. Looks the modules up on sys.path without importing them."""
  platforms = _os.environ.get("JAX_PLATFORMS", "")
  if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
    return False
  return any(m.name.startswith(("jax_cuda", "jax_rocm")) for m in _pkgutil.iter_modules())


# XLA's GPU GEMM autotuner allocates scratch copies of the operands while it compiles (measured on an
# H200: +0.5 GiB of peak memory for switch-base-64 programs), which would break the memory budget
# whenever a new input shape compiles next to resident experts. Off by default (step time was not
# worse without it); set SWAPMOE_KEEP_XLA_AUTOTUNE=1, or any --xla_gpu_autotune_level yourself, to keep it.
# It only takes effect if JAX's GPU backend has not started yet. Set only where a GPU plugin is
# installed: XLA aborts on flags it does not know ("Unknown flags in XLA_FLAGS"), and whether a TPU
# runtime knows this GPU flag was not checked (no TPU was available to this project).
if (_gpu_plugin_installed() and "xla_gpu_autotune_level" not in _os.environ.get("XLA_FLAGS", "")
    and not _os.environ.get("SWAPMOE_KEEP_XLA_AUTOTUNE")):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
  # Without the autotuner XLA's Triton GEMMs run with default tiles: on an H200 the prefill's batched
  # expert matmuls ([K, C, D] x [K, F, D]) ran at ~18 TFLOP/s, 12.7 of a switch-base-64 encode's 16.8 ms.
  # cuBLAS picks its kernels by its own heuristics, with no autotuning and no scratch copies: encode
  # 3.0 ms, whole requests 12 % faster (`benchmarks/profile_prefill.py`, RESULTS.md). Set
  # --xla_gpu_enable_triton_gemm yourself to choose otherwise.
  if "xla_gpu_enable_triton_gemm" not in _os.environ["XLA_FLAGS"]:
    _os.environ["XLA_FLAGS"] += " --xla_gpu_enable_triton_gemm=false"

# XLA's dot merger fuses products that share an input into one GEMM over concatenated weights. Weights
# are arguments of every program here, so the concatenation is a copy made on every call: on an H200 a
# switch-base-64 prefill copied its decoder's 24 cross-attention projections (28 MB, 68 us) and each
# encoder layer's k and v weights on every request (benchmarks/RESULTS.md). Off unless set.
if _gpu_plugin_installed() and "xla_gpu_dot_merger_threshold_mb" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_gpu_dot_merger_threshold_mb=0").strip()

# XLA caps pinned host memory at 64 GB on a GPU by default; exact policies keep every expert there, and
# a Mixtral-8x7B has 87 GiB of experts. Raised to the host's physical memory unless set (same caveats).
if _gpu_plugin_installed() and "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB" not in _os.environ and hasattr(_os, "sysconf"):
  try:
    _os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = str(
        _os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES") // 2**30)
  except (ValueError, OSError):
    pass

from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.models.switch import ConfigError, SwitchConfig, SwitchTransformer
from swapmoe_jax.moe import ExpertSlots, SlotIndex, VirtualExpertMoE
from swapmoe_jax.serving.engine import CausalLM, InputError, SwitchModel
from swapmoe_jax.serving.loader import build_model, experts_budget, load
from swapmoe_jax.serving.sampling import Sampling

__all__ = [
    "CausalLM", "ConfigError", "InputError", "Sampling", "SlotIndex", "ExpertSlots", "SwitchConfig", "SwitchModel",
    "SwitchTransformer", "VirtualExpertMoE", "build_model", "default_checkpoint", "experts_budget", "load",
]
__version__ = "0.1.0"
