"""Int8 copies of expert weights for fallback routing (HOBBIT, arXiv 2411.01433: a token whose expert is
not resident is computed with a low-precision copy kept on the device, instead of being redirected).

Symmetric per-output-channel quantization of a matrix kept as torch's Linear stores it, [out, in]:
  scale[o] = max_i |w[o, i]| / 127,  q[o, i] = clip(rint(w[o, i] / scale[o]), -127, 127)  (int8),
so that w ≈ q · scale[:, None]. A row of zeros has scale 0 (and q 0). Leading axes (experts) are kept:
wi [E, F or 2F, D] -> q int8 [E, F or 2F, D], scale float32 [E, F or 2F]; wo [E, D, F] -> [E, D, F], [E, D].
Quantization runs once, on the host, in numpy (the loader, `VirtualExpertMoE.place_experts`).
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
  """w: [..., out, in] (any float dtype, numpy or jax) -> (q int8 [..., out, in], scale float32 [..., out])."""
  w = np.asarray(w).astype(np.float32)
  scale = np.max(np.abs(w), axis=-1) / np.float32(INT8_MAX)
  safe = np.where(scale > 0, scale, np.float32(1))[..., None]
  q = np.clip(np.rint(w / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
  return q, scale.astype(np.float32)


def dequantize_int8(q, scale) -> np.ndarray:
  """(q int8 [..., out, in], scale float32 [..., out]) -> float32 [..., out, in]."""
  return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)[..., None]


def int8_bytes(out_rows: int, in_cols: int) -> int:
  """Device bytes of one quantized matrix: out × in int8 weights plus `out` float32 scales."""
  return out_rows * in_cols + 4 * out_rows
