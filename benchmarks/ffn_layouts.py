"""The decode step's expert FFN in the two weight orientations: device temporaries and time per step.

  python benchmarks/ffn_layouts.py --slots 64

A jitted call of 16 decode steps (a `lax.scan`, as `generate` runs them) over six MoE layers of
switch-base's expert shape (D 768, F 3072, bfloat16), each step reading one expert per token through
`moe.experts._rows`, for 1 and 8 tokens, with the slot buffers stored
  in-out   wi [K, D, F], wo [K, F, D] (the orientation this project used before), or
  out-in   wi [K, F, D], wo [K, D, F] (torch Linear's, what `moe/experts.py` uses now).
Prints XLA's temporary bytes for the compiled call (what a budget must hold besides the weights),
the median time per step of 20 synchronised calls, and the largest difference of the outputs from
the in-out result (the same function, so bf16 rounding only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, F, STEPS = 768, 3072, 16


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--slots", type=int, default=64, help="K, slots per layer")
  p.add_argument("--layers", type=int, default=6, help="MoE layers per step (switch-base's decoder has 6)")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from swapmoe_jax.moe.experts import _rows

  def in_out(x, s, wi, wo):
    return jnp.einsum("nf,nfd->nd", jax.nn.relu(jnp.einsum("nd,ndf->nf", x, _rows(wi, s))), _rows(wo, s))

  def out_in(x, s, wi, wo):
    return jnp.einsum("nf,ndf->nd", jax.nn.relu(jnp.einsum("nd,nfd->nf", x, _rows(wi, s))), _rows(wo, s))

  def program(ffn):
    @jax.jit
    def run(weights, x, slots):
      def step(x, t):
        for layer, (wi, wo) in enumerate(weights):
          x = x + 0.01 * ffn(x, (slots + 7 * t + layer) % args.slots, wi, wo).astype(x.dtype)
        return x, None
      return jax.lax.scan(step, x, jnp.arange(STEPS))[0]
    return run

  rng = np.random.default_rng(0)
  k = args.slots
  in_out_w = [(jnp.asarray(rng.standard_normal((k, D, F), np.float32) * 0.02, jnp.bfloat16),
               jnp.asarray(rng.standard_normal((k, F, D), np.float32) * 0.02, jnp.bfloat16)) for _ in range(args.layers)]
  out_in_w = [(jnp.swapaxes(a, 1, 2), jnp.swapaxes(b, 1, 2)) for a, b in in_out_w]
  dev = jax.devices()[0]
  print(f"{dev.device_kind}, jax {jax.__version__}: K={k}, {args.layers} MoE layers, {STEPS} steps per call")
  print(f"{'tokens':>6}  {'orientation':<12}{'temporaries MiB':>16}{'ms / step':>11}{'max |diff|':>12}")
  for n in (1, 8):
    x = jnp.asarray(rng.standard_normal((n, D), np.float32), jnp.bfloat16)
    slots = jnp.arange(n, dtype=jnp.int32) * 5
    ref = None
    for name, ffn, weights in (("in-out", in_out, in_out_w), ("out-in", out_in, out_in_w)):
      run = program(ffn)
      temp = run.lower(weights, x, slots).compile().memory_analysis().temp_size_in_bytes
      out = np.asarray(run(weights, x, slots), np.float32)
      times = []
      for _ in range(20):
        t = time.perf_counter()
        run(weights, x, slots).block_until_ready()
        times.append(time.perf_counter() - t)
      ref = out if ref is None else ref
      print(f"{n:>6}  {name:<12}{temp / 2**20:>16.1f}{1e3 * np.median(times) / STEPS:>11.3f}"
            f"{np.max(np.abs(out - ref)):>12.3g}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
