"""Host time to issue a swap's slot writes, with the device idle and with a decode call in flight.

  python benchmarks/swap_dispatch.py --layers 12 --slots 17 --writes 2

On a GPU a decode step is bound by the host launching it, so every millisecond the host spends issuing
swaps between two device calls is a millisecond added to the request. This script times the host side of
one donated, jitted write per expert (`--args`: the executor's `_write_slot_in_place`, or the
`_write_slot` it used before, given its slot and planned map from the host with every write) for `--writes` writes into switch-base's
expert shape (D 768, F 3072, bfloat16; `--layers` layers of `--slots` slots):
  idle       the device has nothing queued;
  in flight  right after dispatching a call that reads every slot buffer (a stand-in for a decode call,
             ~`--busy-ms` of device work), as `after_step` issues them;
and reports the median host milliseconds per write, and whether the busy call plus the writes took longer
than the busy call alone (the writes waiting for it to finish would show as a host time near its length).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, F = 768, 3072


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--slots", type=int, default=17)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--writes", type=int, default=2)
  p.add_argument("--busy-steps", type=int, default=400, help="steps of the stand-in decode call")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--args", choices=["numpy", "device"], default="device",
                 help="numpy: the slot and the planned map from the host with every write (`_write_slot`, "
                      "before); device: cached device scalars and the map updated on the device "
                      "(`_write_slot_in_place`, what the executor does)")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from swapmoe_jax.serving.executor import _write_slot, _write_slot_in_place

  key = jax.random.key(0)
  wi = [0.02 * jax.random.normal(jax.random.fold_in(key, 2 * l), (args.slots, F, D), jnp.bfloat16)
        for l in range(args.layers)]
  wo = [0.02 * jax.random.normal(jax.random.fold_in(key, 2 * l + 1), (args.slots, D, F), jnp.bfloat16)
        for l in range(args.layers)]
  maps = [np.arange(args.experts, dtype=np.int32) % args.slots for _ in range(args.layers)]
  row_wi = jax.device_put(np.zeros((1, F, D), jnp.bfloat16))
  row_wo = jax.device_put(np.zeros((1, D, F), jnp.bfloat16))

  @jax.jit
  def busy(wi, wo, x):
    def step(x, t):
      for a, b in zip(wi, wo):
        s = t % a.shape[0]
        h = jax.nn.relu(jax.lax.dynamic_index_in_dim(a, s, keepdims=False) @ x)
        x = x + 0.01 * (jax.lax.dynamic_index_in_dim(b, s, keepdims=False) @ h)
      return x, None
    return jax.lax.scan(step, x, jnp.arange(args.busy_steps))[0]

  x = jnp.ones((D,), jnp.bfloat16)
  jax.block_until_ready(busy(wi, wo, x))
  t = time.perf_counter()
  for _ in range(5):
    jax.block_until_ready(busy(wi, wo, x))
  busy_ms = 1e3 * (time.perf_counter() - t) / 5

  slot_of = [jax.device_put(m) for m in maps]
  scalars = jax.device_put([np.int32(v) for v in range(max(args.experts, args.slots))])

  def write_numpy(l, slot):  # before: the slot and the planned map transferred with every write
    wi[l], wo[l], _ = _write_slot(wi[l], wo[l], row_wi, row_wo, np.int32(slot), maps[l])

  def write_device(l, slot):  # since: cached device scalars, the map updated on the device
    wi[l], wo[l], slot_of[l] = _write_slot_in_place(wi[l], wo[l], slot_of[l], row_wi, row_wo, scalars[slot],
                                                    scalars[(slot + 7 * l) % args.experts])

  write = write_numpy if args.args == "numpy" else write_device
  for l in range(args.layers):  # compile every buffer shape
    write(l, 0)
  jax.block_until_ready(wi + wo)
  idle, flight, total = [], [], []
  for r in range(args.repeats):
    jax.block_until_ready(wi + wo)
    t = time.perf_counter()
    for j in range(args.writes):
      write((r + j) % args.layers, 1 + j % (args.slots - 1))
    idle.append((time.perf_counter() - t) / args.writes)
    jax.block_until_ready(wi + wo)
    t0 = time.perf_counter()
    out = busy(wi, wo, x)
    t = time.perf_counter()
    for j in range(args.writes):
      write((r + j) % args.layers, 1 + j % (args.slots - 1))
    flight.append((time.perf_counter() - t) / args.writes)
    jax.block_until_ready((out, wi, wo))
    total.append(time.perf_counter() - t0)
  row = {"bench": "swap_dispatch", "args": args.args, "layers": args.layers, "slots": args.slots, "writes": args.writes,
         "busy_ms": busy_ms, "write_idle_ms": 1e3 * float(np.median(idle)),
         "write_in_flight_ms": 1e3 * float(np.median(flight)),
         "busy_plus_writes_ms": 1e3 * float(np.median(total)), "device": jax.devices()[0].device_kind}
  print(f"{args.args} arguments: busy call {busy_ms:.2f} ms; per write: idle {row['write_idle_ms']:.3f} ms, in flight "
        f"{row['write_in_flight_ms']:.3f} ms; busy + writes {row['busy_plus_writes_ms']:.2f} ms")
  return row


if __name__ == "__main__":
  main()
