"""Where a whole request's wall time goes on the host: the runtime's phases and a cProfile of plain requests.

  python benchmarks/profile_host.py --shape switch-base-64 --run lfu:33% --requests 3
  python benchmarks/profile_host.py --shape mixtral-8x7b --layers 4 --run swapmoe:2/8 --requests 2

A request's time is the device's work plus whatever the host does while the device waits. This script
builds one random-weight model as the benchmarks do (`random_model.build` for Switch shapes,
`bench_causal.build` for the decoder-only ones; `--layers N` keeps the first N layers of a decoder-only
shape (a name of both kinds, `tiny`, is the Switch one), so a Mixtral-sized layer can be studied without 87 GiB of experts), warms it up with two
requests, then runs `--requests` plain requests and reports, per request (medians of times, means of call counts):
  - the whole request, as `bench_decode` times it;
  - the host time inside each phase of the residency runtime (`before_request`, `after_prefill`,
    `after_step`, `flush`, and within them staging and committing swaps): a phase that blocks on the
    device or copies experts on the host shows here;
  - the swaps made and the experts read from host memory (exact policies);
  - the last request's host timeline: when each device call's bookkeeping (`after_prefill`,
    `after_step`, `flush`) began and how long it took, and when the request returned;
  - two streamed requests after them: when the last one's first and last tokens reached the host, when
    it returned, and its host timeline beside the plain request's;
and the functions of largest cumulative and own time from a cProfile of the same requests; then
`--alternate` pairs of plain and streamed requests without the profiler, each with its swaps and
experts read from host memory. `--writes numpy` makes the executor's slot writes take their slot and
index map from the host, as before 2026-12-02, for a comparison with today's writes in one session. One JSON
line per run is appended to `--out` when given.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import io
import json
import os
import pstats
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


class _Phases:
  """Wall time spent inside wrapped methods, per request (nested phases count in both)."""

  def __init__(self):
    self.now: collections.Counter = collections.Counter()
    self.calls: collections.Counter = collections.Counter()
    self.start = time.perf_counter()  # of the current request
    self.timeline: list[tuple[str, float, float]] = []  # (phase, ms from the request's start, ms inside)

  def wrap(self, obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def timed(*a, **k):
      t = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        self.now[label] += time.perf_counter() - t
        self.calls[label] += 1
        self.timeline.append((label, 1e3 * (t - self.start), 1e3 * (time.perf_counter() - t)))

    setattr(obj, name, timed)

  def take(self) -> dict:
    out = {k: (1e3 * v, self.calls[k]) for k, v in self.now.items()}
    self.now.clear()
    self.calls.clear()
    self.timeline = []
    self.start = time.perf_counter()
    return out


def _build(args):
  """(model, cfg, prompt function) for the shape."""
  if args.shape not in _switch_shapes():
    import bench_causal
    from swapmoe_jax.models.decoder.config import DecoderConfig
    from swapmoe_jax.serving import loader

    hf = bench_causal.hf_config(args.shape)
    if args.layers:
      hf.num_hidden_layers = args.layers
    cfg = DecoderConfig.from_hf_dict(hf.to_dict())
    cfg = dataclasses.replace(cfg, eos_token_ids=(-1,)) if hasattr(cfg, "eos_token_ids") else cfg
    policy, budget = args.run.split(":")[:2]
    model, *_ = bench_causal.build(cfg, args.dtype, policy, budget, batch=1, src_len=args.src_len,
                                   new_tokens=args.new_tokens, update_every=16, max_swaps=args.max_swaps,
                                   steps_per_call=16, staging=args.staging or loader.DEFAULT_STAGING, progress=False,
                                   swap_between_requests=_drain(args))
    rng = np.random.default_rng(1)
    return model, cfg, lambda: (bench_causal.random_prompt(rng, cfg, 1, args.src_len),)
  import random_model
  from shapes import SHAPES
  from swapmoe_jax.serving import loader

  if args.layers:
    raise SystemExit("--layers is for the decoder-only shapes")
  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))
  policy, budget = args.run.split(":")[:2]
  kw = {} if _drain(args) is None else {"swap_between_requests": _drain(args)}
  built = random_model.build(cfg, args.dtype, policy, budget, batch=1, src_len=args.src_len,
                             new_tokens=args.new_tokens, max_swaps=args.max_swaps, pool=cfg.num_experts,
                             staging=args.staging or loader.DEFAULT_STAGING, **kw)
  rng = np.random.default_rng(1)
  return built.model, cfg, lambda: (random_model.random_prompts(rng, cfg, 1, args.src_len)[0],)


def _numpy_writes() -> None:
  """Makes every one-device executor write as before: `_write_slot` with the slot and the planned index
  map from the host (two host->device transfers a write)."""
  from swapmoe_jax.serving import executor

  def write_row(self, leaves, positions, row_wi, row_wo, w, index_map):
    a, b, m = positions
    leaves[a], leaves[b], leaves[m] = executor._write_slot(leaves[a], leaves[b], row_wi, row_wo, np.int32(w.slot),
                                                           index_map)

  executor.SwapExecutor._write_row = write_row


def _alternate(model, prompt, new_tokens: int, n: int, res) -> list[dict]:
  """`n` pairs of requests, one plain and one streamed (a no-op callback), alternating, without the
  profiler: whether a streamed request is faster because it streams, or because of when it runs."""
  import jax

  rows = []
  for i in range(2 * n):
    mode = "plain" if i % 2 == 0 else "streamed"
    tele0 = model.stats.summary() if model.stats is not None else {}
    w0 = res.executor.experts_written if res is not None and res.executor is not None else 0
    ids = prompt()
    t = time.perf_counter()
    out = model.generate(*ids, max_new_tokens=new_tokens,
                         stream=None if mode == "plain" else (lambda step, tok: None))
    jax.block_until_ready(out)
    ms = 1e3 * (time.perf_counter() - t)
    tele = model.stats.summary() if model.stats is not None else {}
    w1 = res.executor.experts_written if res is not None and res.executor is not None else 0
    rows.append({"mode": mode, "ms": round(ms, 2), "swaps": int(w1 - w0),
                 "missed_experts": float(tele.get("missed_experts", 0) - tele0.get("missed_experts", 0))})
  return rows


def _switch_shapes():
  from shapes import SHAPES

  return SHAPES


def _drain(args):
  return None if args.drain is None else args.drain == "on"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="switch-base-64")
  p.add_argument("--layers", type=int, help="decoder-only shapes: keep the first N layers")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--run", default="lfu:33%", help="policy:budget")
  p.add_argument("--staging", help="default: the loader's")
  p.add_argument("--drain", choices=["on", "off"], help="swap_between_requests (default: the loader's)")
  p.add_argument("--max-swaps", type=int, default=2)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--requests", type=int, default=3)
  p.add_argument("--writes", choices=["device", "numpy"], default="device",
                 help="numpy: the executor's slot writes as before 2026-12-02 (the slot and the planned map "
                      "from the host with every write), for a comparison in one run")
  p.add_argument("--alternate", type=int, default=4, help="pairs of plain and streamed requests, unprofiled")
  p.add_argument("--top", type=int, default=25, help="cProfile rows printed")
  p.add_argument("--out", help="append one JSON line here")
  args = p.parse_args(argv)

  import jax

  if args.writes == "numpy":
    _numpy_writes()
  t0 = time.perf_counter()
  model, cfg, prompt = _build(args)
  jax.block_until_ready(model._slots.leaves)
  print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
  phases = _Phases()
  res = model.residency
  if res is not None:
    for name in ("before_request", "after_prefill", "after_step", "flush", "_observe", "_issue_writes"):
      phases.wrap(res, name, name)
    if res.executor is not None:
      phases.wrap(res.executor, "stage", "executor.stage")
      phases.wrap(res.executor, "commit", "executor.commit")
  for _ in range(2):  # compilation, then one more
    model.generate(*prompt(), max_new_tokens=args.new_tokens)
  phases.take()
  tele0 = model.stats.summary() if model.stats is not None else {}
  written0 = res.executor.experts_written if res is not None and res.executor is not None else 0
  prof = cProfile.Profile()
  walls, per = [], []
  timeline = None
  for _ in range(args.requests):
    ids = prompt()
    phases.take()
    t = phases.start = time.perf_counter()
    prof.enable()
    out = model.generate(*ids, max_new_tokens=args.new_tokens)
    jax.block_until_ready(out)
    prof.disable()
    walls.append(time.perf_counter() - t)
    timeline = [(k, a, b) for k, a, b in phases.timeline if k in ("after_prefill", "after_step", "flush")]
    timeline.append(("return", 1e3 * walls[-1], 0.0))
    per.append(phases.take())
  # Streamed requests: when their tokens reached the host, against when they returned, and the host
  # timeline of the last one beside the plain request's.
  for _ in range(2):
    stamps = []
    phases.take()
    t = phases.start = time.perf_counter()
    model.generate(*prompt(), max_new_tokens=args.new_tokens,
                   stream=lambda step, tok: stamps.append(time.perf_counter()))
    streamed = {"first_token_ms": 1e3 * (stamps[0] - t), "last_token_ms": 1e3 * (stamps[-1] - t),
                "return_ms": 1e3 * (time.perf_counter() - t)}
    streamed_timeline = [(k, a, b) for k, a, b in phases.timeline if k in ("after_prefill", "after_step", "flush")]
    streamed_timeline.append(("return", streamed["return_ms"], 0.0))
  phases.take()
  tele = model.stats.summary() if model.stats is not None else {}
  written = (res.executor.experts_written if res is not None and res.executor is not None else 0) - written0
  alternating = _alternate(model, prompt, args.new_tokens, args.alternate, res)
  names = sorted({k for d in per for k in d})
  summary = {k: (float(np.median([d.get(k, (0, 0))[0] for d in per])),
                 float(np.mean([d.get(k, (0, 0))[1] for d in per]))) for k in names}
  n = args.requests
  row = {"bench": "profile_host", "writes": args.writes, "shape": args.shape, "layers": args.layers, "run": args.run,
         "drain": None if res is None else res.swap_between_requests, "staging": args.staging,
         "request_ms": 1e3 * float(np.median(walls)), "requests": n,
         "phases_ms": {k: round(v[0], 3) for k, v in summary.items()},
         "phase_calls": {k: v[1] for k, v in summary.items()},
         "swaps_per_request": written / n,
         "missed_experts_per_request": (tele.get("missed_experts", 0) - tele0.get("missed_experts", 0)) / n,
         "bytes_from_host_per_request": (tele.get("bytes_from_host", 0) - tele0.get("bytes_from_host", 0)) / n,
         "timeline_ms": [(k, round(a, 2), round(b, 2)) for k, a, b in timeline], "streamed": streamed,
         "streamed_timeline_ms": [(k, round(a, 2), round(b, 2)) for k, a, b in streamed_timeline],
         "alternating": alternating,
         "device": jax.devices()[0].device_kind}
  print(f"\n{args.shape}{f' ({args.layers} layers)' if args.layers else ''} {args.run}: request "
        f"{row['request_ms']:.1f} ms (median of {n}), swaps/request {row['swaps_per_request']:.1f}, experts from host "
        f"{row['missed_experts_per_request']:.1f} ({row['bytes_from_host_per_request'] / 1e9:.2f} GB)")
  for k, (ms, calls) in summary.items():
    print(f"  {k:18s} {ms:9.2f} ms in {calls:.1f} calls")
  print("  last request, host timeline (phase: entered at ms, ms inside): " +
        ", ".join(f"{k} {a:.1f}+{b:.1f}" for k, a, b in timeline))
  print("  a streamed request: first token {first_token_ms:.1f} ms, last token {last_token_ms:.1f} ms, "
        "returned {return_ms:.1f} ms".format(**streamed))
  print("  its host timeline: " + ", ".join(f"{k} {a:.1f}+{b:.1f}" for k, a, b in streamed_timeline))
  if alternating:
    print("  alternating plain and streamed requests (no profiler): mode, ms, swaps, experts from host")
    for r in alternating:
      print(f"    {r['mode']:8s} {r['ms']:8.1f} {r['swaps']:5d} {r['missed_experts']:6.0f}")
    for mode in ("plain", "streamed"):
      ms = [r["ms"] for r in alternating if r["mode"] == mode]
      print(f"  {mode}: median {np.median(ms):.1f} ms over {len(ms)}")
  s = io.StringIO()
  st = pstats.Stats(prof, stream=s)
  st.sort_stats("cumulative").print_stats(args.top)
  st.sort_stats("tottime").print_stats(args.top)
  print("\n".join(l for l in s.getvalue().splitlines() if l.strip() and "{built-in method builtins.exec}" not in l))
  if args.out:
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
  return row


if __name__ == "__main__":
  main()
