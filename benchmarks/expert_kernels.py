"""The decode step's expert FFN for few tokens, implementation by implementation, at a family's expert size.

  python benchmarks/expert_kernels.py --shape mixtral --tokens 2 --layers 4
  python benchmarks/expert_kernels.py --shape switch --tokens 1 --layers 6 --slots 17

A jitted call of 16 decode steps (a `lax.scan`, as `generate` runs them) over `--layers` MoE layers of the
shape's expert (mixtral: D 4096, F 14336, SwiGLU; olmoe: D 2048, F 1024, SwiGLU; switch: D 768, F 3072,
ReLU; bfloat16), `--slots` slots per layer, each step sending `--tokens` rows (token-choice pairs) through
the experts in their slots, computed by:
  stacked   `moe.experts._ffn_gather` before this script: the rows' experts stacked (`_rows`, a copy of
            N experts), then one batched product per weight;
  unrolled  per row, its expert read by a dynamic slice feeding the product, no stacked copy;
  branches  per row, a `lax.switch` over the slots whose branches read a static slot;
  all_slots every slot's expert for every row, then each row's own taken (reads K experts, not N);
  current   `moe.experts._ffn_gather` as it is in this tree.
Prints per implementation: the median time per step over 20 synchronised calls, the expert bytes a step
must read (rows x layers x expert bytes) over that time (GB/s, against the device's memory bandwidth),
XLA's temporary bytes for the compiled call, and the largest difference from `stacked` (bf16 rounding).
XLA_FLAGS such as `--xla_gpu_enable_dynamic_slice_fusion=true` apply as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"mixtral": (4096, 14336, "glu"), "olmoe": (2048, 1024, "glu"), "switch": (768, 3072, "mlp")}
STEPS = 16


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
  p.add_argument("--tokens", type=int, nargs="+", default=[2])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--slots", type=int, default=2)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--impls", nargs="+", help="default: all")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from swapmoe_jax.moe import experts
  from swapmoe_jax.moe.activations import expert_hidden

  d, f, kind = SHAPES[args.shape]
  act = expert_hidden("silu" if kind == "glu" else "relu", kind)
  rows_f = 2 * f if kind == "glu" else f

  def stacked(x, s, wi, wo):
    h = act(jnp.einsum("nd,nfd->nf", x, experts._rows(wi, s)))
    return jnp.einsum("nf,ndf->nd", h, experts._rows(wo, s))

  def unrolled(x, s, wi, wo):
    out = []
    for i in range(x.shape[0]):
      w1 = jax.lax.dynamic_index_in_dim(wi, s[i], keepdims=False)
      w2 = jax.lax.dynamic_index_in_dim(wo, s[i], keepdims=False)
      out.append(act(w1 @ x[i]) @ w2.T)
    return jnp.stack(out)

  def branches(x, s, wi, wo):
    def branch(k):
      return lambda xi: act(wi[k] @ xi) @ wo[k].T
    return jnp.stack([jax.lax.switch(s[i], [branch(k) for k in range(wi.shape[0])], x[i]) for i in range(x.shape[0])])

  def all_slots(x, s, wi, wo):
    h = act(jnp.einsum("nd,kfd->nkf", x, wi))
    y = jnp.einsum("nkf,kdf->nkd", h, wo)
    return jnp.take_along_axis(y, s[:, None, None], axis=1)[:, 0]

  def current(x, s, wi, wo):
    return experts._ffn_gather(x, s, wi, wo, act)

  impls = {"stacked": stacked, "unrolled": unrolled, "branches": branches, "all_slots": all_slots,
           "current": current}
  if args.impls:
    impls = {k: impls[k] for k in ["stacked"] + [i for i in args.impls if i != "stacked"]}

  def program(ffn):
    @jax.jit
    def run(weights, x, slots):
      def step(x, t):
        for layer, (wi, wo) in enumerate(weights):
          x = x + 0.01 * ffn(x, (slots + t + layer) % args.slots, wi, wo).astype(x.dtype)
        return x, None
      return jax.lax.scan(step, x, jnp.arange(STEPS))[0]
    return run

  key = jax.random.key(0)
  weights = []
  for layer in range(args.layers):
    k1, k2, key = jax.random.split(key, 3)
    weights.append((0.02 * jax.random.normal(k1, (args.slots, rows_f, d), jnp.bfloat16),
                    0.02 * jax.random.normal(k2, (args.slots, d, f), jnp.bfloat16)))
  expert_bytes = (rows_f * d + d * f) * 2
  dev = jax.devices()[0]
  print(f"{args.shape}: D {d}, F {f} ({kind}), expert {expert_bytes / 2**20:.0f} MiB, {args.layers} layers, "
        f"{args.slots} slots, {STEPS} steps per call, {dev.device_kind}")
  rows = []
  for n in args.tokens:
    x = jax.random.normal(key, (n, d), jnp.bfloat16)
    slots = jnp.arange(n, dtype=jnp.int32) % args.slots
    ref = None
    for name, ffn in impls.items():
      run = program(ffn)
      compiled = run.lower(weights, x, slots).compile()
      mem = compiled.memory_analysis()
      temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
      out = jax.block_until_ready(run(weights, x, slots))
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(weights, x, slots))
        times.append(time.perf_counter() - t)
      per_step = float(np.median(times)) / STEPS
      read = n * args.layers * expert_bytes  # distinct rows' experts; a repeated slot is read again
      ref = out if ref is None else ref
      diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
      row = {"bench": "expert_kernels", "shape": args.shape, "tokens": n, "layers": args.layers,
             "slots": args.slots, "impl": name, "ms_per_step": 1e3 * per_step, "gb_per_s": read / per_step / 1e9,
             "temp_bytes": temp, "max_diff": diff, "device": dev.device_kind}
      rows.append(row)
      print(f"  tokens {n:2d} {name:9s} {1e3 * per_step:8.3f} ms/step  {read / per_step / 1e9:7.0f} GB/s  "
            f"temp {0 if temp is None else temp / 2**20:8.1f} MiB  max|diff| {diff:.2e}", flush=True)
  return rows


if __name__ == "__main__":
  main()
