"""Where a Switch prefill's time goes: the encoder alone, the first token, and the MoE FFN's dispatch.

  python benchmarks/profile_prefill.py --shape switch-base-64 --dtype bfloat16 --budgets none 33% \
      --src-lens 128 512 --trace-dir /tmp/trace

For each budget (one model each, `random_model.build`): the median wall time of `decode.encode`
(the jitted encoder plus the decoder's cross-attention cache: what a request's first call runs before
its first decode step) at each input length, and of `generate(max_new_tokens=1)` (time to first
token, whole call). Then, at the same shapes, the expert FFN of one MoE layer (`moe/experts.py`'s
dispatch into a [K, C, D] buffer) timed alone, with XLA's temporary bytes for it. (A sort-by-slot
dispatch through `lax.ragged_dot_general`, tried in this script on an H200 with Triton GEMMs, took 2.6x
to 10x as long with 8x to 16x the temporaries, so it is not in the library.)
`--ffn-variants` also times other ways of computing that FFN and the router (`ffn_variant_rows`), and
`--encode-variants` the encode compiled other ways (`encode_variants`): benchmarks/RESULTS.md, "The
prefill's kernels". With `--trace-dir`, a profiler trace of a few encodes of the first budget (a Perfetto JSON, readable
by `python benchmarks/profile_prefill.py --summarize FILE`: device time per kernel name, then per GPU
stream its events, time and largest kernels, and the time in which some stream was busy).
Results as JSON lines on stdout (prefixed "RESULT ") and in `--out`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn, repeats):
  import jax

  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _dispatch_ms(fn, repeats, release=False):
  """Median host time until `fn()` returns (XLA enqueues a program's kernels on the calling thread),
  and median wall time until its outputs are ready, in ms: when the two are close, the GPU may be
  waiting on the host (its launches, XLA's update of the program's CUDA graph); RESULTS.md, session 34,
  found the host's excess there but the wall time set by the GPU. release: free each call's outputs
  before the next call (as a request's are gone before the next request), after two warm-up calls."""
  import jax

  for _ in range(2 if release else 1):
    jax.block_until_ready(fn())
  host, wall = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    host.append(t1 - t0)
    wall.append(time.perf_counter() - t0)
    if release:
      del out
  return 1e3 * float(np.median(host)), 1e3 * float(np.median(wall))


def _gpu_events(path: str) -> tuple[list[dict], dict]:
  """The complete ("X") events on GPU streams of a Perfetto trace written by `jax.profiler.trace(...,
  create_perfetto_trace=True)`, and {(pid, tid): stream name} of their threads."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names, threads = {}, {}  # pid -> process name; (pid, tid) -> thread name
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e["args"].get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"].get("name", "")
  gpu = {pid for pid, n in names.items() if "/device:GPU" in n or "GPU" in n and "Host" not in n}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu], threads


def summarize(path: str, top: int = 25) -> list[tuple[str, float, int]]:
  """Device time per kernel name in a Perfetto trace written by `jax.profiler.trace(...,
  create_perfetto_trace=True)`: [(name, total ms, count)], largest first (events on GPU streams only)."""
  total = collections.defaultdict(float)
  count = collections.Counter()
  for e in _gpu_events(path)[0]:
    total[e["name"]] += e.get("dur", 0) / 1e3
    count[e["name"]] += 1
  rows = sorted(((n, t, count[n]) for n, t in total.items()), key=lambda r: -r[1])
  return rows[:top] if top else rows


def summarize_streams(path: str, top: int = 5) -> dict:
  """Per GPU stream of a Perfetto trace: its events, their device ms and its `top` kernel names by time;
  with the trace's span on the GPU (first start to last end) and the time in which some stream was busy
  (the union of all events), in ms. A second stream's kernels are what the device did beside the main
  one; their names say which program issued them."""
  events, threads = _gpu_events(path)
  per = collections.defaultdict(list)
  for e in events:
    per[(e["pid"], e.get("tid"))].append(e)
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events)
  busy, end = 0.0, None
  for lo, hi in spans:
    if end is None or lo > end:
      busy += hi - lo
      end = hi
    elif hi > end:
      busy += hi - end
      end = hi
  streams = []
  for key, evs in per.items():
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in evs:
      by_name[e["name"]][0] += e.get("dur", 0) / 1e3
      by_name[e["name"]][1] += 1
    names = sorted(((n, t, c) for n, (t, c) in by_name.items()), key=lambda r: -r[1])[:top]
    streams.append({"stream": threads.get(key, f"{key[0]}/{key[1]}"), "events": len(evs),
                    "ms": sum(e.get("dur", 0) for e in evs) / 1e3, "top": names})
  streams.sort(key=lambda s: -s["ms"])
  return {"span_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0, "busy_ms": busy / 1e3,
          "streams": streams}


def trace_to(dest: str, fn) -> str | None:
  """Runs `fn()` under `jax.profiler.trace` and keeps its Perfetto trace (host threads with the Python
  calls, GPU streams) at `dest` (a .json.gz that `summarize` reads). Returns dest, or None where the
  profiler wrote none. The raw profile goes to a scratch folder beside dest, removed afterwards."""
  import jax

  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  scratch = dest + ".raw"
  shutil.rmtree(scratch, ignore_errors=True)
  with jax.profiler.trace(scratch, create_perfetto_trace=True):
    fn()
  found = glob.glob(os.path.join(scratch, "**", "perfetto_trace.json.gz"), recursive=True)
  if found:
    shutil.copy(max(found, key=os.path.getmtime), dest)
  shutil.rmtree(scratch, ignore_errors=True)
  return dest if found else None


def phase_rows(model, ids, mask, new_tokens, repeats, trace_dir=None, tag=""):
  """Where a request's time to first token goes, one device call at a time (each synchronised), and
  what a streamed request's first token waits for (`generate`, stamped as `timing.py` does).

  Rows: `what="phase"` with the median ms of each piece — `encode` (`decode.encode`), `step_1` (the
  one-step first call), `steps_16_run` (a 16-step call whose steps all run the model), `steps_16_skip`
  (the same program with `remaining=0`: every step takes the `lax.cond`'s skip branch),
  `steps_16_noskip` (`skip_finished=False`: no `lax.cond` in the scan), `dispatch_16` (the host's time
  for a 16-step call to return, its device work queued behind a synchronised point), and `ttft`
  (a streamed `generate`: from the call to the first token reaching the callback). With `trace_dir`,
  a profiler trace of one streamed request (host threads and GPU streams)."""
  import jax

  from swapmoe_jax.serving import decode
  from swapmoe_jax.serving.sampling import Sampling

  cfg = model.config
  b = ids.shape[0]
  max_len = decode.cache_length(new_tokens)
  sampling = Sampling()

  def fresh():
    cache, _ = decode.encode(model._graphdef, model._params, model._slots, ids, mask, max_len, model._banks)
    tokens = model._put(np.full((b,), cfg.decoder_start_token_id, np.int32))
    done = model._put(np.zeros((b,), bool))
    key = model._put(jax.random.key(0))
    pos = model._put(np.zeros((), np.int32))
    return jax.block_until_ready((cache, tokens, done, key, pos))

  def call(state, n, remaining, skip=True):
    cache, tokens, done, key, pos = state
    return decode.decode_steps(model._graphdef, model._params, model._slots, tokens, done, cache, pos, key,
                               model._banks, model._zero_stats(), sampling, cfg.pad_token_id, cfg.eos_token_ids,
                               n, skip, np.int32(remaining))

  def timed(n, remaining, skip=True, sync=True):
    out = []
    for _ in range(repeats + 1):
      state = fresh()
      t0 = time.perf_counter()
      r = call(state, n, remaining, skip)
      if sync:
        jax.block_until_ready(r)
      out.append(time.perf_counter() - t0)
      jax.block_until_ready(r)
    return 1e3 * float(np.median(out[1:]))

  ms = {"encode": _median_ms(lambda: decode.encode(model._graphdef, model._params, model._slots, ids, mask,
                                                    max_len, model._banks), repeats),
        "step_1": timed(1, 1), "steps_16_run": timed(16, 16), "steps_16_skip": timed(16, 0),
        "steps_16_noskip": timed(16, 16, skip=False), "dispatch_16": timed(16, 16, sync=False)}

  def streamed():
    stamps = []
    t0 = time.perf_counter()
    model.generate(ids, mask, max_new_tokens=new_tokens, stream=lambda step, tok: stamps.append(time.perf_counter()))
    return stamps[0] - t0, stamps[-1] - t0

  streamed()
  runs = [streamed() for _ in range(max(3, repeats // 4))]
  ms["ttft"] = 1e3 * float(np.median([r[0] for r in runs]))
  ms["request_streamed"] = 1e3 * float(np.median([r[1] for r in runs]))
  if trace_dir:
    trace_to(os.path.join(trace_dir, f"request_{tag}.json.gz"), streamed)
  print("phases (ms): " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
  return {"what": "phase", "new_tokens": new_tokens} | {f"{k}_ms": v for k, v in ms.items()}


def _ffn_cases(cfg, dtype, budgets_k, src_lens):
  """(K, N, x, slot, wi, wo, keep, C) for one MoE layer's expert FFN at each K and N: random weights,
  tokens spread uniformly over the slots, HF's capacity C for batch 1."""
  import jax.numpy as jnp

  from swapmoe_jax.moe import experts as experts_lib

  rng = np.random.default_rng(0)
  for k in budgets_k:
    wi = jnp.asarray(rng.standard_normal((k, cfg.d_ff, cfg.d_model), np.float32) * 0.03, dtype)
    wo = jnp.asarray(rng.standard_normal((k, cfg.d_model, cfg.d_ff), np.float32) * 0.02, dtype)
    for n in src_lens:
      x = jnp.asarray(rng.standard_normal((n, cfg.d_model), np.float32), dtype)
      slot = jnp.asarray(rng.integers(0, k, n), jnp.int32)
      yield k, n, x, slot, wi, wo, jnp.ones((n,), bool), experts_lib.dispatch_capacity(n, 1, cfg.expert_capacity)


def dispatch_rows(cfg, dtype, budgets_k, src_lens, repeats):
  """The expert FFN of one MoE layer alone at each (K, N)."""
  import jax

  from swapmoe_jax.moe import experts as experts_lib
  from swapmoe_jax.moe.activations import expert_hidden

  rows = []
  act = expert_hidden("relu", "mlp")
  for k, n, x, slot, wi, wo, keep, cap in _ffn_cases(cfg, dtype, budgets_k, src_lens):
    fn = jax.jit(lambda x, slot, wi, wo, keep: experts_lib.expert_ffn(
        x, slot, wi, wo, act, keep=keep, capacity=cap, grouped=True))
    ma = fn.lower(x, slot, wi, wo, keep).compile().memory_analysis()
    ms = _median_ms(lambda: fn(x, slot, wi, wo, keep), repeats)
    rows.append({"what": "ffn", "impl": "dispatch", "slots": k, "tokens": n, "capacity": cap, "ms": ms,
                 "temp_bytes": None if ma is None else ma.temp_size_in_bytes})
    print(f"ffn dispatch K={k:<3} N={n:<4} C={cap:<4} {ms:8.3f} ms  temp "
          f"{(ma.temp_size_in_bytes if ma else 0) / 2**20:8.1f} MiB", flush=True)
  return rows


def ffn_variant_rows(cfg, dtype, budgets_k, src_lens, repeats):
  """Exploration: one MoE layer's expert FFN (dispatch path) and router, timed alone, implementation
  by implementation, at each (K, N):
    current     `experts.expert_ffn` (buffer of C = HF capacity rows per slot);
    rows=R      the same with a buffer of R rows per slot (tokens past R dropped: timing only);
    kfc         the products written with the slot's F (then D) as the leading axis of the output;
    bucketed    a `lax.switch` over buffers of 8, 16, 32 ... C rows, the smallest that holds the most
                tokens any slot keeps (exact: the same tokens kept as `current`);
    router_dot  the float32 router logits as a HIGHEST-precision matmul (`router._logits_dot`);
    router_sum  the same logits as a broadcast multiply and a sum (`router._logits_sum`: a reduction
                fusion, no GEMM)."""
  import functools

  import jax
  import jax.numpy as jnp

  from swapmoe_jax.moe import experts as experts_lib
  from swapmoe_jax.moe import router as router_lib
  from swapmoe_jax.moe.activations import expert_hidden

  act = expert_hidden("relu", "mlp")
  rng = np.random.default_rng(0)
  rows_out = []

  def dispatch(x, slot, wi, wo, keep, capacity, rows, order="kcf"):
    num_slots = wi.shape[0]
    one_hot = jax.nn.one_hot(slot, num_slots, dtype=jnp.int32) * keep[:, None].astype(jnp.int32)
    pos = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1
    pos = jnp.where(keep & (pos >= 0) & (pos < min(capacity, rows)), pos, rows)
    buf = jnp.zeros((num_slots, rows, x.shape[1]), x.dtype).at[slot, pos].set(x, mode="drop")
    if order == "kcf":
      h = act(jnp.einsum("kcd,kfd->kcf", buf, wi))
      y = jnp.einsum("kcf,kdf->kcd", h.astype(wo.dtype), wo)
    else:
      h = act(jnp.einsum("kfd,kcd->kfc", wi, buf))
      y = jnp.swapaxes(jnp.einsum("kdf,kfc->kdc", wo, h.astype(wo.dtype)), 1, 2)
    return y.at[slot, pos].get(mode="fill", fill_value=0)

  def bucketed(x, slot, wi, wo, keep, capacity):
    num_slots = wi.shape[0]
    sizes = []
    c = 8
    while c < capacity:
      sizes.append(c)
      c *= 2
    sizes.append(capacity)
    counts = jnp.sum(jax.nn.one_hot(slot, num_slots, dtype=jnp.int32) * keep[:, None], axis=0)
    need = jnp.minimum(jnp.max(counts), capacity)
    idx = jnp.sum(need > jnp.asarray(sizes[:-1], jnp.int32))
    branches = [functools.partial(dispatch, capacity=capacity, rows=r) for r in sizes]
    return jax.lax.switch(idx, branches, x, slot, wi, wo, keep)

  for k, n, x, slot, wi, wo, keep, cap in _ffn_cases(cfg, dtype, budgets_k, src_lens):
    variants = {"current": lambda x, slot, wi, wo, keep: experts_lib.expert_ffn(
        x, slot, wi, wo, act, keep=keep, capacity=cap, grouped=True)}
    for r in (8, 16, 32):
      if r < cap:
        variants[f"rows={r}"] = functools.partial(dispatch, capacity=cap, rows=r)
    variants["kfc"] = functools.partial(dispatch, capacity=cap, rows=cap, order="kfc")
    variants["bucketed"] = functools.partial(bucketed, capacity=cap)
    ref = None
    for name, f in variants.items():
      fn = jax.jit(f)
      ma = fn.lower(x, slot, wi, wo, keep).compile().memory_analysis()
      ms = _median_ms(lambda: fn(x, slot, wi, wo, keep), repeats)
      out = np.asarray(fn(x, slot, wi, wo, keep), np.float32)
      ref = out if ref is None else ref
      err = float(np.max(np.abs(out - ref)))
      rows_out.append({"what": "ffn_variant", "impl": name, "slots": k, "tokens": n, "capacity": cap,
                       "max_load": int(np.bincount(np.asarray(slot), minlength=k).max()), "ms": ms,
                       "temp_bytes": None if ma is None else ma.temp_size_in_bytes, "max_abs_diff": err})
      print(f"ffn {name:<9} K={k:<3} N={n:<4} C={cap:<4} {ms:8.3f} ms  temp "
            f"{(ma.temp_size_in_bytes if ma else 0) / 2**20:7.1f} MiB  |diff| {err:.3g}", flush=True)
  for n in src_lens:
    xr = jnp.asarray(rng.standard_normal((n, cfg.d_model), np.float32), dtype)
    wr = jnp.asarray(rng.standard_normal((cfg.d_model, cfg.num_experts), np.float32) * 0.02, jnp.float32)
    routers = {"router_dot": router_lib._logits_dot, "router_sum": router_lib._logits_sum}
    ref = None
    for name, f in routers.items():
      fn = jax.jit(f)
      ms = _median_ms(lambda: fn(xr, wr), repeats)
      out = np.asarray(fn(xr, wr))
      ref = out if ref is None else ref
      rows_out.append({"what": "router_variant", "impl": name, "tokens": n, "experts": cfg.num_experts,
                       "ms": ms, "max_abs_diff": float(np.max(np.abs(out - ref)))})
      print(f"{name:<10} N={n:<4} E={cfg.num_experts} {ms:8.4f} ms  |diff| {np.max(np.abs(out - ref)):.3g}",
            flush=True)
  return rows_out


def encode_variants(model, ids, mask, repeats):
  """The encode (numpy prompt, as `generate` passes it) compiled three ways, each a fresh jit of
  `decode.encode`'s function: as the library does; with the router as a HIGHEST matmul on the GPU too
  (`router.ROUTER_SUM_ON_GPU` off while it traces); without XLA command buffers for this program."""
  import jax

  from swapmoe_jax.moe import router as router_lib
  from swapmoe_jax.serving import decode

  fn = decode.encode.__wrapped__
  variants = {"library": {}, "router_dot": {}, "no_command_buffers": {"xla_gpu_enable_command_buffer": ""}}
  rows = []
  for name, options in variants.items():
    jitted = jax.jit(fn, static_argnums=(0, 5), compiler_options=options or None)
    call = lambda: jitted(model._graphdef, model._params, model._slots, ids, mask,  # noqa: E731
                          decode.cache_length(64), model._banks)
    router_lib.ROUTER_SUM_ON_GPU = name != "router_dot"
    try:
      jax.block_until_ready(call())  # traces and compiles with the flag as set
    finally:
      router_lib.ROUTER_SUM_ON_GPU = True
    ms = _median_ms(call, repeats)
    host_ms, _ = _dispatch_ms(call, repeats)
    rows.append({"what": "encode_variant", "impl": name, "encode_ms": ms, "encode_host_ms": host_ms})
    print(f"  encode {name:<20} {ms:8.3f} ms (host {host_ms:.3f})", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--shape", default="switch-base-64")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--budgets", nargs="+", default=["none", "33%"])
  p.add_argument("--src-lens", type=int, nargs="+", default=[128, 512])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--pool", type=int, default=4, help="distinct experts per layer (speed of the prefill does not "
                 "depend on whether experts repeat: they are read from the device's slot buffers)")
  p.add_argument("--trace-dir", default=None)
  p.add_argument("--phases", action="store_true", help="time a request's first-token path call by call "
                 "(`phase_rows`) at the first input length, for each budget")
  p.add_argument("--out", default=None)
  p.add_argument("--encode-variants", action="store_true", help="also time the encode compiled other ways "
                 "(`encode_variants`)")
  p.add_argument("--ffn-variants", action="store_true", help="also time alternative implementations of one "
                 "layer's expert FFN and router (`ffn_variant_rows`)")
  p.add_argument("--summarize", default=None, help="a Perfetto trace: print device time per kernel, "
                 "then per GPU stream, and exit")
  args = p.parse_args(argv)
  if args.summarize:
    rows = summarize(args.summarize, top=40)
    all_ms = sum(t for _, t, _ in summarize(args.summarize, top=0))
    print(f"device time in kernels: {all_ms:.3f} ms")
    for name, ms, n in rows:
      print(f"{ms:9.3f} ms {n:6d}x  {name[:140]}")
    s = summarize_streams(args.summarize)
    print(f"GPU span {s['span_ms']:.3f} ms, some stream busy {s['busy_ms']:.3f} ms; per stream:")
    for st in s["streams"]:
      print(f"  {st['stream']}: {st['events']} events, {st['ms']:.3f} ms")
      for name, ms, n in st["top"]:
        print(f"    {ms:9.3f} ms {n:6d}x  {name[:120]}")
    return

  import jax

  import random_model
  from shapes import SHAPES
  from swapmoe_jax.serving import decode, loader

  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))
  jdtype = loader.DTYPES[args.dtype]
  results = []

  def emit(row):
    row = {"shape": args.shape, "dtype": args.dtype, "device": jax.devices()[0].device_kind} | row | {
        "commit": os.environ.get("SWAPMOE_COMMIT"), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    results.append(row)
    print("RESULT " + json.dumps(row), flush=True)

  max_len = max(args.src_lens)
  ks = []
  for b_i, budget in enumerate(args.budgets):
    policy = "full" if budget == "none" else "swapmoe"
    built = random_model.build(cfg, args.dtype, policy, None if budget == "none" else budget, batch=1,
                               src_len=max_len, new_tokens=64, pool=args.pool)
    model = built.model
    ks.append(max(built.plan.slots_per_layer))
    rng = np.random.default_rng(1)
    for n in args.src_lens:
      ids, mask = random_model.random_prompts(rng, cfg, 1, n)
      enc = lambda: decode.encode(model._graphdef, model._params, model._slots, ids, mask,  # noqa: E731
                                  decode.cache_length(64), model._banks)
      enc_ms = _median_ms(enc, args.repeats)
      enc_host_ms, _ = _dispatch_ms(enc, args.repeats)
      # The same encode with the prompt already on the device, the same two arrays every call: if XLA's
      # CUDA graph update (new buffer addresses) is what the host waits on, this one skips it.
      d_ids, d_mask = jax.device_put(ids), jax.device_put(mask)
      enc_dev = lambda: decode.encode(model._graphdef, model._params, model._slots, d_ids, d_mask,  # noqa: E731
                                      decode.cache_length(64), model._banks)
      dev_ms = _median_ms(enc_dev, args.repeats)
      dev_host_ms, _ = _dispatch_ms(enc_dev, args.repeats)
      if args.encode_variants:
        for row in encode_variants(model, ids, mask, args.repeats):
          emit({"policy": policy, "budget": budget, "slots": ks[-1], "tokens": n} | row)
      first_ms = _median_ms(lambda: model.generate(ids, max_new_tokens=1), max(3, args.repeats // 4))
      emit({"what": "prefill", "policy": policy, "budget": budget, "slots": ks[-1], "tokens": n,
            "encode_ms": enc_ms, "encode_host_ms": enc_host_ms, "encode_device_inputs_ms": dev_ms,
            "encode_device_inputs_host_ms": dev_host_ms, "first_token_ms": first_ms})
      print(f"{policy:<8} {budget:<5} K={ks[-1]:<3} N={n:<4} encode {enc_ms:8.3f} ms (host {enc_host_ms:.3f}; "
            f"inputs on the device {dev_ms:.3f}, host {dev_host_ms:.3f})   "
            f"generate(1 token) {first_ms:8.3f} ms", flush=True)
      if args.phases and n == args.src_lens[0]:
        emit({"policy": policy, "budget": budget, "slots": ks[-1], "tokens": n}
             | phase_rows(model, ids, mask, 64, args.repeats, args.trace_dir, f"{policy}_{budget}".replace("%", "")))
      if args.trace_dir and b_i == 0 and n == args.src_lens[0]:
        dest = trace_to(os.path.join(args.trace_dir, f"encode_{policy}_{n}.json.gz"),
                        lambda: [jax.block_until_ready(enc()) for _ in range(3)])
        if dest:
          rows = summarize(dest, top=15)
          print(f"encode trace ({dest}), device ms per kernel over 3 encodes:")
          for name, ms, cnt in rows:
            print(f"  {ms:8.3f} ms {cnt:5d}x {name[:120]}")
  for row in dispatch_rows(cfg, jdtype, sorted(set(ks)), args.src_lens, args.repeats):
    emit(row)
  if args.ffn_variants:
    for row in ffn_variant_rows(cfg, jdtype, sorted(set(ks), reverse=True), args.src_lens, args.repeats):
      emit(row)
  if args.out:
    with open(args.out, "a") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
