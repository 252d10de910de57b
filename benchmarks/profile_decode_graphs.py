"""Why every decode call of a request updates its CUDA graph, and what stops it: a request's decode calls
compiled several ways, timed whole and (under XLA's command-buffer log) counted for graph updates.

  python benchmarks/profile_decode_graphs.py --shape switch-base-64 --requests 20 [--out FILE]
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 \\
      python benchmarks/profile_decode_graphs.py --requests 3 2> LOG
  python benchmarks/profile_encode_host.py --vlog-summary LOG

XLA records a `lax.scan`'s loop as one CUDA graph and re-records it (0.3-1.3 ms of host time for a
switch-base decode step, RESULTS.md session 37) whenever a buffer it reads or writes has moved since its
last execution. A request's calls pass their state (last tokens, finished flags, position, routing
statistics) from one call's outputs to the next call's inputs, so every call sees new addresses. Each
variant runs the same request (a 128-token prompt, `encode`, a one-step first call and four calls of 16
steps, greedy, batch 1, `full`), as `generate` does, and none waits for the device before the request's
end:
  generate     the library's `generate` (the reference); generate_nostats: the same without the model's
               residency (its routing statistics and telemetry, which `full` keeps too);
  lib_loop     this loop over `decode.decode_steps` as `generate` calls it (the remaining steps sent as a
               numpy scalar every call); lib_loop16: the same without the one-step first call;
  end_const    the steps' end as an absolute position in a device scalar that every call shares;
  donate       + the state donated from call to call (the finished flags also returned as a copy the
               host keeps), so that a call's state buffers are the previous call's;
  donate_zeros + each call's statistics from the shared zero accumulator (as `swapmoe` windows start)
               summed inside the loop from zeros and added to it after the loop;
  toks_buf     + the call's tokens written into a donated buffer and copied out after the loop.
Results: per variant the median request wall time, the median host time of each call position, and the
host's time outside device calls: before the encode, between consecutive calls, after the last returned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def steps_impl(graphdef, params, slots, tokens, done, cache, pos, key, banks, stats_sum, end, toks_buf, sampling,
               pad_id, eos_ids, num_steps, internal_acc):
  """`decode.decode_steps` with its end as an absolute position (`pos >= end` skips the model), the
  statistics optionally summed from zeros inside the loop, and the tokens optionally written into
  `toks_buf`. Returns (tokens [n, B], last tokens, done, done (a second buffer), cache, pos, stats_sum,
  toks_buf or None)."""
  import jax
  import jax.numpy as jnp

  from swapmoe_jax.serving import decode, sampling as sampling_lib

  model = decode._merge(graphdef, params, slots)
  eos = jnp.asarray(eos_ids, jnp.int32)

  def step(carry):
    tokens, done, cache, pos, acc = carry
    logits, cache, stats = model.decode_step(tokens, pos, cache, banks, live=~done)
    nxt = sampling_lib.select(logits, jax.random.fold_in(key, pos), sampling)
    nxt = jnp.where(done, pad_id, nxt)
    done = done | jnp.isin(nxt, eos)
    return nxt, done, cache, pos + 1, jax.tree.map(jnp.add, acc, stats)

  def skip(carry):
    tokens, done, cache, pos, acc = carry
    return jnp.full_like(tokens, pad_id), done, cache, pos + 1, acc

  def body(carry, i):
    state, buf = carry
    state = jax.lax.cond(jnp.all(state[1]) | (state[3] >= end), skip, step, state)
    if buf is not None:
      buf = jax.lax.dynamic_update_index_in_dim(buf, state[0], i, 0)
    return (state, buf), (None if buf is not None else state[0])

  acc0 = jax.tree.map(jnp.zeros_like, stats_sum) if internal_acc else stats_sum
  with decode._numerics(graphdef):
    ((last, done, cache, pos, acc), buf), out = jax.lax.scan(
        body, ((tokens, done, cache, pos, acc0), toks_buf), jnp.arange(num_steps, dtype=jnp.int32))
  stats = jax.tree.map(jnp.add, stats_sum, acc) if internal_acc else acc
  if buf is not None:
    out = buf
  return out, last, done, done, cache, pos, stats, buf


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--shape", default="switch-base-64")
  p.add_argument("--budget", default="none", help="none (`full`) or a `swapmoe` budget such as 33%%: the "
                 "generate variants then run `swapmoe` (the loops still call the same programs, without swaps)")
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--requests", type=int, default=20)
  p.add_argument("--variants", default="generate,lib_loop,end_const,donate,donate_zeros,toks_buf")
  p.add_argument("--out", default=None, help="append the result as one JSON line")
  a = p.parse_args(argv)

  import jax

  import random_model
  from shapes import SHAPES
  from swapmoe_jax.serving import decode
  from swapmoe_jax.serving.sampling import Sampling

  cfg = dataclasses.replace(SHAPES[a.shape], eos_token_ids=(-1,))
  policy = "full" if a.budget == "none" else "swapmoe"
  built = random_model.build(cfg, "bfloat16", policy, None if a.budget == "none" else a.budget, batch=1,
                             src_len=a.src_len, new_tokens=64, pool=4)
  m = built.model
  ids, mask = random_model.random_prompts(np.random.default_rng(1), cfg, 1, a.src_len)
  max_len, steps, chunk = decode.cache_length(64), 64, 16
  calls = [1] + [chunk] * -(-(steps - 1) // chunk)
  calls16 = [chunk] * (steps // chunk)
  sampling, pad, eos = Sampling(), cfg.pad_token_id, tuple(cfg.eos_token_ids)
  put = m._put
  start = put(np.full((1,), cfg.decoder_start_token_id, np.int32))
  no_done, pos0 = put(np.zeros((1,), bool)), put(np.zeros((), np.int32))
  key, end = put(jax.random.key(0)), put(np.asarray(steps, np.int32))
  zeros = m._zero_stats()
  static = (12, 13, 14, 15, 16)
  plain = jax.jit(steps_impl, static_argnums=(0,) + static, donate_argnums=(5,))
  # tokens, done, cache, pos (+ stats_sum when chained) and toks_buf
  donating = jax.jit(steps_impl, static_argnums=(0,) + static, donate_argnums=(3, 4, 5, 6, 11))
  donating_stats = jax.jit(steps_impl, static_argnums=(0,) + static, donate_argnums=(3, 4, 5, 6, 9, 11))

  marks = []  # (t before, t after) of every encode / decode_steps call of the current request

  def timed(fn):
    def call(*args, **kw):
      t0 = time.perf_counter()
      try:
        return fn(*args, **kw)
      finally:
        marks.append((t0, time.perf_counter()))
    return call

  decode.encode, decode.decode_steps = timed(decode.encode), timed(decode.decode_steps)
  residency = m.residency

  def request(variant):
    if variant.startswith("generate"):
      m.residency = None if variant == "generate_nostats" else residency
      try:
        return m.generate(ids, max_new_tokens=steps)
      finally:
        m.residency = residency
    cache, _ = decode.encode(m._graphdef, m._params, m._slots, ids, mask, max_len, m._banks)
    tokens, done, pos, stats = start, no_done, pos0, zeros
    out, host = [], []
    dispatched = 0
    for i, n in enumerate(calls16 if variant == "lib_loop16" else calls):
      t0 = time.perf_counter()
      print(f"CALL steps n={n}", file=sys.stderr, flush=True)
      if variant in ("lib_loop", "lib_loop16"):
        toks, tokens, done, cache, pos, stats = decode.decode_steps(
            m._graphdef, m._params, m._slots, tokens, done, cache, pos, key, m._banks, stats, sampling, pad, eos, n,
            True, np.int32(steps - dispatched))
        keep = done
      else:
        first = i == 0  # the first call's inputs are shared constants: never donated
        fn = plain if first or variant == "end_const" else donating if variant != "donate" else donating_stats
        if variant == "donate_zeros":
          stats = zeros  # every call starts from the shared zero accumulator; the host keeps the outputs
        buf = None
        if variant == "toks_buf":
          buf = held.get(n)
          if buf is None or first:
            buf = put(np.zeros((n, 1), np.int32))
        toks, tokens, done, keep, cache, pos, stats, buf = fn(
            m._graphdef, m._params, m._slots, tokens, done, cache, pos, key, m._banks, stats, end, buf, sampling, pad,
            eos, n, variant in ("donate_zeros", "toks_buf"))
        if buf is not None:
          held[n] = buf
      host.append(time.perf_counter() - t0)
      dispatched += n
      out.append((toks, keep))
    got = jax.device_get([t for t, _ in out])
    host_ms.setdefault(variant, []).append(host)
    return np.concatenate(got, axis=0)

  held, host_ms, walls, phases = {}, {}, {}, {}
  variants = a.variants.split(",")
  reference = None
  for v in variants:
    for _ in range(3):
      toks = request(v)
    toks = np.asarray(toks).reshape(-1)[:steps]
    if reference is None:
      reference = toks
    same = bool(np.array_equal(reference, toks))
    host_ms.pop(v, None)
    print(f"PHASE {v}", file=sys.stderr, flush=True)
    for _ in range(a.requests):
      marks.clear()
      t0 = time.perf_counter()
      request(v)
      t1 = time.perf_counter()
      walls.setdefault(v, []).append(t1 - t0)
      # host time before the first device call, between calls, and after the last one returned
      phases.setdefault(v, []).append([marks[0][0] - t0] + [b[0] - a_[1] for a_, b in zip(marks, marks[1:])]
                                      + [t1 - marks[-1][1]])
    print(f"PHASE_END {v}", file=sys.stderr, flush=True)
    per_call = np.median(np.asarray(host_ms[v]), axis=0) * 1e3 if v in host_ms else []
    print(f"{v:<13} request {1e3 * np.median(walls[v]):7.2f} ms (min {1e3 * min(walls[v]):6.2f})  tokens as "
          f"generate: {same}  host per call " + " ".join(f"{x:.2f}" for x in per_call), flush=True)
    print(f"{'':<13} host before the encode, between calls, after the last: "
          + " ".join(f"{x:.2f}" for x in np.median(np.asarray(phases[v]), axis=0) * 1e3), flush=True)
  row = {"what": "decode_graphs", "shape": a.shape, "dtype": "bfloat16", "policy": policy, "budget": a.budget,
         "tokens": a.src_len,
         "new_tokens": steps, "device": jax.devices()[0].device_kind,
         "request_ms": {v: round(1e3 * float(np.median(w)), 3) for v, w in walls.items()},
         "host_gaps_ms": {v: [round(1e3 * float(x), 3) for x in np.median(np.asarray(g), axis=0)]
                          for v, g in phases.items()},
         "commit": os.environ.get("SWAPMOE_COMMIT")}
  print("RESULT " + json.dumps(row), flush=True)
  if a.out:
    with open(a.out, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
