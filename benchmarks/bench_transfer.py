"""Host->device copy speed and overlap on one device: the ceiling a swap can reach.

  python benchmarks/bench_transfer.py --expert-mb 9.4

Measures, each synchronised and repeated (median):
  * the pinned host->device bandwidth of one large `device_put` (the ceiling of a swap);
  * one expert's copy by `device_put` from its own pinned array (a copy on a transfer stream),
    and by a jitted gather out of a pinned [E, ...] bank (a copy inside a program: compute stream);
  * overlap: a compute-bound program (~10x the copies' time) alone, and with the copies issued while it
    runs; the share of
    copy time hidden is 1 - (together - compute alone) / copies alone;
  * batched staging, the executor's way (`HostExpertStore.stage_rows`): n experts by one `device_put`
    call over n pinned arrays, and by one program gathering n rows out of pinned banks, for n = 2 (a
    commit's writes by default) and n = --copies; as bytes/s against the pinned bandwidth;
  * copies beside compute, n = 1, 2, 4 and --copies rows: gathered inside the compute program, or by a
    program of their own right behind it — what each adds to the compute alone — and pinned rows
    `device_put` then committed by a donated write, issued behind the compute program or before it;
  * a slot commit: one donated `dynamic_update_slice` of an expert into a [K, D, F] buffer.
Prints a table and, with --json, writes the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np


def _median_s(fn, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn())  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def measure(expert_shape=(768, 3072), dtype="bfloat16", num_experts=16, slots=16, copies=8, big_mb=512,
            repeats=7, device=None, compute_n=4096) -> dict:
  """The figures described in the module docstring, as a dict (seconds and bytes/s)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  from swapmoe_jax.serving.store import host_memory_kind

  device = device or jax.devices()[0]
  kind = host_memory_kind(device)
  host = SingleDeviceSharding(device, memory_kind=kind) if kind else None
  dev = SingleDeviceSharding(device)
  jdt = jnp.dtype(dtype)
  out = {"device": device.device_kind, "platform": device.platform, "host_memory_kind": kind}

  def to_host(a):
    return jax.device_put(a, host) if host is not None else a

  big = to_host(np.ones(int(big_mb * 2**20 // jdt.itemsize), jdt))
  t = _median_s(lambda: jax.device_put(big, dev), repeats)
  out["pinned_bandwidth"] = big.nbytes / t
  experts = [to_host(np.full(expert_shape, i, jdt)) for i in range(copies)]
  one = experts[0].nbytes
  out["expert_bytes"] = one
  out["device_put_expert_s"] = _median_s(lambda: jax.device_put(experts[0], dev), repeats)
  bank = to_host(np.ones((num_experts,) + tuple(expert_shape), jdt))

  @jax.jit
  def gather(bank, i):
    row = jax.lax.dynamic_index_in_dim(bank, i, keepdims=False)
    return jax.device_put(row, jax.memory.Space.Device) if host is not None else row

  idx = jax.device_put(np.int32(3), dev)
  out["gather_expert_s"] = _median_s(lambda: gather(bank, idx), repeats)

  # Overlap: a compute-bound program (a chain of matmuls) with copies issued behind it.
  x = jax.device_put(np.ones((compute_n, compute_n), jdt) / compute_n, dev)

  @functools.partial(jax.jit, static_argnums=1)
  def compute(x, iters):
    def body(_, y):
      return jnp.tanh(y @ x)
    return jax.lax.fori_loop(0, iters, body, x)

  # As many matmuls as take ~10x the copies alone, so that hiding them or not is measurable.
  iters = 4
  one_pass = _median_s(lambda: compute(x, iters), 3) / iters
  copy_s = _median_s(lambda: [jax.device_put(e, dev) for e in experts], 3)
  iters = int(np.clip(10 * copy_s / one_pass, 1, 10_000))
  out["compute_s"] = _median_s(lambda: compute(x, iters), repeats)
  out["copies"] = copies
  out["copies_alone_s"] = _median_s(lambda: [jax.device_put(e, dev) for e in experts], repeats)
  out["together_s"] = _median_s(lambda: (compute(x, iters), [jax.device_put(e, dev) for e in experts]), repeats)
  out["gathers_alone_s"] = _median_s(lambda: [gather(bank, idx) for _ in range(copies)], repeats)
  out["together_gather_s"] = _median_s(lambda: (compute(x, iters), [gather(bank, idx) for _ in range(copies)]), repeats)
  for name, alone, both in (("device_put", "copies_alone_s", "together_s"),
                            ("gather", "gathers_alone_s", "together_gather_s")):
    extra = out[both] - out["compute_s"]
    out[f"hidden_share_{name}"] = float(np.clip(1.0 - extra / out[alone], 0.0, 1.0))

  # Copies beside compute, the ways a swap could run them: n rows gathered out of the pinned bank inside
  # the compute program (XLA free to schedule them beside the loop), or by a program of their own issued
  # right behind it; against the compute alone (each line's "extra" is what the copies added). And the
  # "transfer" path as a swap uses it: device_put of pinned rows, then a donated write of each into a
  # slot buffer on the compute stream, issued after the compute program or before it.
  if host is not None:
    def take(bank, idx, n):
      return [jax.device_put(jax.lax.dynamic_index_in_dim(bank, idx[j], keepdims=False), jax.memory.Space.Device)
              for j in range(n)]

    @functools.partial(jax.jit, static_argnums=(1, 3))
    def compute_and_gather(x, iters, idx, n, bank):
      return compute.__wrapped__(x, iters), take(bank, idx, n)

    gather_n = jax.jit(take, static_argnums=2)
    for n in sorted({1, 2, 4, copies}):
      idx_n = jax.device_put(np.arange(n, dtype=np.int32) % num_experts, dev)
      alone = _median_s(lambda: gather_n(bank, idx_n, n), repeats)
      inside = _median_s(lambda: compute_and_gather(x, iters, idx_n, n, bank), repeats)
      behind = _median_s(lambda: (compute(x, iters), gather_n(bank, idx_n, n)), repeats)
      out[f"rows_{n}_gather_alone_s"] = alone
      out[f"rows_{n}_in_program_extra_s"] = inside - out["compute_s"]
      out[f"rows_{n}_program_behind_extra_s"] = behind - out["compute_s"]
    slot_buf = {"b": jax.device_put(np.zeros((copies,) + tuple(expert_shape), jdt), dev)}

    @functools.partial(jax.jit, donate_argnums=0)
    def put_rows(buf, rows):
      for j, r in enumerate(rows):
        buf = jax.lax.dynamic_update_slice_in_dim(buf, r[None], j, axis=0)
      return buf

    def transfer_and_commit(copy_first):
      if copy_first:
        rows = [jax.device_put(e, dev) for e in experts]
        y = compute(x, iters)
      else:
        y = compute(x, iters)
        rows = [jax.device_put(e, dev) for e in experts]
      slot_buf["b"] = put_rows(slot_buf["b"], rows)
      return y, slot_buf["b"]

    for name, first in (("transfer_behind_commit", False), ("transfer_first_commit", True)):
      t = _median_s(lambda: transfer_and_commit(first), repeats)
      out[f"{name}_extra_s"] = t - out["compute_s"]
      out[f"hidden_share_{name}"] = float(np.clip(1.0 - (t - out["compute_s"]) / out["copies_alone_s"], 0.0, 1.0))

  # Batched staging: what `HostExpertStore.stage_rows` does for a commit's writes.
  from swapmoe_jax.serving.store import _gather_rows

  for n in sorted({2, copies}):
    dp = _median_s(lambda: jax.device_put(experts[:n], dev), repeats)
    if host is not None:
      idx_n = jax.device_put(np.arange(n, dtype=np.int32) % num_experts, dev)
      gr = _median_s(lambda: _gather_rows((bank,) * n, (bank,) * n, idx_n), repeats)  # 2n rows: wi and wo
    else:
      gr = float("nan")
    out[f"batched_device_put_{n}_s"], out[f"batched_gather_{n}_s"] = dp, gr
    out[f"batched_device_put_{n}_bandwidth"] = n * one / dp
    out[f"batched_gather_{n}_bandwidth"] = 2 * n * one / gr

  # Commit: a donated one-slot write, with the slot index on the device or from numpy.
  @jax.jit
  def write(buf, row, slot):
    return jax.lax.dynamic_update_slice_in_dim(buf, row[None], slot, axis=0)
  write_donated = jax.jit(write.__wrapped__, donate_argnums=0)
  buf = jax.device_put(np.zeros((slots,) + tuple(expert_shape), jdt), dev)
  row = jax.device_put(experts[1], dev)
  state = {"buf": buf}

  def commit(slot):
    state["buf"] = write_donated(state["buf"], row, slot)
    return state["buf"]

  out["commit_device_slot_s"] = _median_s(lambda: commit(idx), repeats)
  out["commit_numpy_slot_s"] = _median_s(lambda: commit(np.int32(3)), repeats)
  out["commit_undonated_s"] = _median_s(lambda: write(state["buf"], row, idx), repeats)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--expert-shape", default="768,3072", help="D,F of one expert matrix (switch-base: 768,3072)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--copies", type=int, default=8)
  p.add_argument("--big-mb", type=float, default=512)
  p.add_argument("--compute-n", type=int, default=4096, help="matmul size of the compute-bound program")
  p.add_argument("--json", help="write the figures here")
  args = p.parse_args(argv)
  shape = tuple(int(s) for s in args.expert_shape.split(","))
  r = measure(shape, args.dtype, copies=args.copies, big_mb=args.big_mb,
              compute_n=args.compute_n)
  for k, v in r.items():
    if k.endswith("_s"):
      print(f"{k:<28}{1e3 * v:10.3f} ms")
    elif k.endswith("bandwidth"):
      print(f"{k:<28}{v / 1e9:10.2f} GB/s")
    else:
      print(f"{k:<28}{v!s:>10}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
