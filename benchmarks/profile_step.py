"""Where the device memory and the decode-step time go, stage by stage (one policy, one shape).

  python benchmarks/profile_step.py --shape switch-base-64 --dtype bfloat16 --policy swapmoe --budget 33%

Prints device bytes in use and peak after each stage (host store, model build, first generate), the
largest live device arrays, and for the decode step: host dispatch time per step (no sync) against the
device time per step (a 64-step loop synchronised once), so host-bound and device-bound steps can be
told apart.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--shape", default="switch-base-8")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--policy", default="swapmoe")
  p.add_argument("--budget", default="33%")
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--batch", type=int, default=1)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  import random_model
  from shapes import SHAPES
  from swapmoe_jax.serving import decode

  dev = jax.devices()[0]
  gib = 2**30

  def mem(stage):
    s = dev.memory_stats() or {}
    print(f"{stage:<28} in use {s.get('bytes_in_use', 0) / gib:7.3f} GiB   peak {s.get('peak_bytes_in_use', 0) / gib:7.3f} GiB",
          flush=True)

  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))
  mem("start")
  built = random_model.build(cfg, args.dtype, args.policy, None if args.policy == "full" else args.budget,
                             batch=args.batch, src_len=args.src_len, new_tokens=args.new_tokens)
  model, plan = built.model, built.plan
  mem(f"model built, host store ({built.store.memory_kind})")
  print("plan:", plan.breakdown, plan.slots_per_layer[:4], flush=True)
  jax.block_until_ready(model._slots.leaves)
  mem("model built")
  by_shape = collections.Counter()
  for a in jax.live_arrays():
    if a.sharding.memory_kind in (None, "device"):
      by_shape[(a.shape, str(a.dtype))] += a.nbytes
  for (shp, dt), n in by_shape.most_common(8):
    print(f"   live {n / gib:7.3f} GiB  {dt}{list(shp)}")
  print(f"   live device total {sum(by_shape.values()) / gib:.3f} GiB")
  ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.src_len))
  # What XLA planned for the prefill program (set XLA_FLAGS=--xla_dump_to=DIR to see its buffers).
  def memory_analysis(label, lowered):
    ma = lowered.compile().memory_analysis()
    if ma is not None:
      print(f"{label} program: arguments {ma.argument_size_in_bytes / gib:.3f} GiB, outputs "
            f"{ma.output_size_in_bytes / gib:.3f} GiB, temporaries {ma.temp_size_in_bytes / gib:.3f} GiB "
            f"(plan's workspace {plan.breakdown.workspace_bytes / gib:.3f} GiB)", flush=True)

  memory_analysis("prefill", decode.encode.lower(model._graphdef, model._params, model._slots, ids,
                                                 np.ones_like(ids, bool), decode.cache_length(args.new_tokens),
                                                 model._banks))
  model.generate(ids, max_new_tokens=args.new_tokens)
  mem("after first generate")
  # Decode step alone: host dispatch vs device time.
  cache, _ = decode.encode(model._graphdef, model._params, model._slots, ids, np.ones_like(ids, bool),
                           decode.cache_length(args.new_tokens), model._banks)
  # Committed to the device like the step's outputs: uncommitted inputs would compile a second program
  # inside the timed loop (which once made this script report 53 ms per step).
  put = lambda x: jax.device_put(x, dev)  # noqa: E731
  tokens, done = put(jnp.zeros((args.batch,), jnp.int32)), put(jnp.zeros((args.batch,), bool))
  pos = put(jnp.zeros((), jnp.int32))
  acc = put(decode.zero_stats(len(cfg.decoder_sparse_layers), cfg.num_experts))
  key = put(jax.random.key(0))
  from swapmoe_jax.serving.sampling import Sampling

  memory_analysis("decode (16 steps)", decode.decode_steps.lower(
      model._graphdef, model._params, model._slots, tokens, done, cache, pos, key, model._banks, acc, Sampling(),
      0, (-1,), 16))

  def time_calls(label, call, calls, steps_per_call):
    """Host dispatch and wall time per decode step of `calls` calls, after one untimed call."""
    nonlocal pos
    pos = put(jnp.zeros((), jnp.int32))
    call()
    jax.block_until_ready(tokens)
    pos = put(jnp.zeros((), jnp.int32))
    t0 = time.perf_counter()
    for _ in range(calls):
      call()
    t1 = time.perf_counter()
    jax.block_until_ready(tokens)
    t2 = time.perf_counter()
    n = calls * steps_per_call
    print(f"{label}: host dispatch {1e3 * (t1 - t0) / n:.3f} ms/step, wall {1e3 * (t2 - t0) / n:.3f} ms/step "
          f"({calls} calls, one sync)")

  def step():
    nonlocal tokens, done, cache, pos, acc
    tokens, done, cache, pos, acc = decode.decode_step(model._graphdef, model._params, model._slots, tokens, done,
                                                       cache, pos, key, model._banks, acc, Sampling(), 0, (-1,))

  time_calls("decode step", step, min(48, args.new_tokens - 2), 1)
  for chunk in (8, 16):  # several steps per call (what generate does): one dispatch per `chunk` steps
    def steps():
      nonlocal tokens, done, cache, pos, acc
      _, tokens, done, cache, pos, acc = decode.decode_steps(model._graphdef, model._params, model._slots, tokens,
                                                             done, cache, pos, key, model._banks, acc, Sampling(), 0,
                                                             (-1,), chunk)

    time_calls(f"decode_steps x{chunk}", steps, max(1, (args.new_tokens - 2) // chunk), chunk)
  ex = model.residency.executor if model.residency is not None else None
  if ex is not None:  # the two halves of a swap, each synchronised
    from swapmoe_jax.serving.swap import SlotWrite

    ctrl = model.residency.controller
    st, cm = [], []
    for r in range(8):
      writes = []
      for layer in range(min(ex.max_writes, ctrl.num_layers)):
        cur = ctrl.state.slot_expert[layer]
        out = [e for e in range(cfg.num_experts) if e not in set(cur.tolist())][r % 2]
        writes.append(SlotWrite(layer, 0, out, int(cur[0])))
      t0 = time.perf_counter()
      staged = ex.stage(writes)
      jax.block_until_ready(staged)
      t1 = time.perf_counter()
      ctrl._pending.extend(writes)
      ctrl.commit(writes)
      maps = [ctrl.state.index_map(l) for l in range(ctrl.num_layers)]
      model._slots = ex.commit(model._slots, staged, writes, maps)
      jax.block_until_ready(model._slots.leaves)
      t2 = time.perf_counter()
      if r:
        st.append(t1 - t0)
        cm.append(t2 - t1)
    mb = ex.max_writes * model.store.expert_bytes / 1e6
    print(f"swap of {ex.max_writes} experts ({mb:.1f} MB): stage {1e3 * np.median(st):.3f} ms "
          f"({mb / 1e3 / np.median(st):.1f} GB/s), commit {1e3 * np.median(cm):.3f} ms")
  mem("end")


if __name__ == "__main__":
  main()
