"""Int8 and int4 copies of expert weights for fallback routing (HOBBIT, arXiv 2411.01433: a token whose
expert is not resident is computed with a low-precision copy kept on the device, instead of being
redirected).

Symmetric per-output-channel quantization of a matrix kept as torch's Linear stores it, [out, in]:
  scale[o] = max_i |w[o, i]| / 127,  q[o, i] = clip(rint(w[o, i] / scale[o]), -127, 127)  (int8),
so that w ≈ q · scale[:, None]. A row of zeros has scale 0 (and q 0). Leading axes (experts) are kept:
wi [E, F or 2F, D] -> q int8 [E, F or 2F, D], scale float32 [E, F or 2F]; wo [E, D, F] -> [E, D, F], [E, D].
Quantization runs once, on the host, in numpy (the loader, `VirtualExpertMoE.place_experts`).

Int4 (`bits=4`): the same with 7 for 127 (q in [-7, 7]), two values packed per int8 along the input
axis, the even column in the low nibble, the odd one in the high nibble: q [..., out, in / 2]. A packed
matrix is told from an int8 one by its halved minor axis (`is_packed`); `unpack_int4` restores the
int8 values on the device, inside the step.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
BITS = (8, 4)
_QMAX = {8: 127, 4: 7}


def quantize(w, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """w: [..., out, in] -> (q int8 [..., out, in] (bits 8) or packed int4 pairs [..., out, in / 2] (bits 4),
  scale float32 [..., out])."""
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
  w = np.asarray(w).astype(np.float32)
  if bits == 4 and w.shape[-1] % 2:
    raise ValueError(f"int4 packs pairs of input columns: the input size must be even, got {w.shape[-1]}")
  qmax = _QMAX[bits]
  scale = np.max(np.abs(w), axis=-1) / np.float32(qmax)
  safe = np.where(scale > 0, scale, np.float32(1))[..., None]
  q = np.clip(np.rint(w / safe), -qmax, qmax).astype(np.int8)
  return (q if bits == 8 else pack_int4(q)), scale.astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int8 values in [-8, 7], [..., n] (n even) -> int8 [..., n / 2]: column 2j in the low nibble, 2j+1 high."""
  u = np.asarray(q).astype(np.uint8) & np.uint8(0x0F)
  return (u[..., 0::2] | (u[..., 1::2] << np.uint8(4))).view(np.int8)


def unpack_int4(p):
  """Packed int4 pairs, int8 [..., n] (numpy or jax) -> their int8 values [..., 2n] (jax): shifts that
  sign-extend each nibble."""
  import jax.numpy as jnp

  p = jnp.asarray(p, jnp.int8)
  lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
  hi = jnp.right_shift(p, 4)
  return jnp.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))


def is_packed(q, in_size: int) -> bool:
  """Whether quantized weights q [..., out, in or in / 2] hold packed int4 pairs for `in_size` inputs."""
  return q.shape[-1] * 2 == in_size and in_size > 1


def dequantize(q, scale, bits: int = 8) -> np.ndarray:
  """(q, scale) from `quantize(w, bits)` -> float32 [..., out, in]."""
  values = np.asarray(unpack_int4(q)) if bits == 4 else np.asarray(q)
  return values.astype(np.float32) * np.asarray(scale, np.float32)[..., None]


def quant_bytes(out_rows: int, in_cols: int, bits: int = 8) -> int:
  """Device bytes of one quantized matrix: out × in weights of `bits` bits plus `out` float32 scales."""
  return out_rows * in_cols * bits // 8 + 4 * out_rows


def quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
  """w: [..., out, in] (any float dtype, numpy or jax) -> (q int8 [..., out, in], scale float32 [..., out])."""
  return quantize(w, 8)


def dequantize_int8(q, scale) -> np.ndarray:
  """(q int8 [..., out, in], scale float32 [..., out]) -> float32 [..., out, in]."""
  return dequantize(q, scale, 8)
