"""Decode latency and peak device memory of each policy and peer under a budget, side by side in one run.

  python benchmarks/bench_decode.py --shape switch-base-64 --dtype bfloat16 \\
      --runs full:none swapmoe:33% lfu:33% pruned:33% hf:none accelerate:33% --batch 1 8

Each run is a fresh subprocess (so that the runtime's peak-memory counter starts at zero) that builds
the shape with random weights (speed and memory do not depend on the values), plans for the budget,
generates `--new-tokens` tokens greedily for `--repeats` prompts, and reports per-request figures as a
user sees them (`timing.py`: whole-request latency and ms per generated token, time to first token,
per-token decode from whole device-call boundaries, p50/p95 per call), tokens/s, the measured peak device memory
against the budget, the policy's telemetry, and the swaps made while timed. `--shape`, `--dtype` and
`--batch` take several values: every run is made for each combination.

Runs are `policy:budget[:staging]` (`full:none`, `swapmoe:33%`, `lru:4GiB`, `selective@0.1:33%` with its
threshold, `fallback@4:50%` with int4 copies, ...), a peer from `peers.py`
(`hf:none`, `accelerate:33%`), or `transfer:none` (`bench_transfer.py`: the pinned host->device
bandwidth and copy/compute overlap on this device, for the swap figures). `--parallel N` runs N
subprocesses at a time, one per GPU (CUDA_VISIBLE_DEVICES). `--trace-dir DIR` also writes a profiler
trace of one request per run (`request_<run>.json.gz`). Results: a table on stdout and JSON lines
appended to `--out` (commit, device, versions, config, figures); `report.py` turns them into
`RESULTS.md` tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed_generates(model, prompt, args) -> dict:
  """Per-request figures of `--repeats` requests of `--new-tokens` tokens (`timing.py`)."""
  import timing

  chunk = args.steps_per_call
  plain, streams = [], []
  for _ in range(args.repeats):
    ids = prompt()
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.new_tokens, steps_per_call=chunk)
    plain.append(time.perf_counter() - t)
    if out.shape[1] != args.new_tokens:
      raise RuntimeError(f"a request stopped after {out.shape[1]} of {args.new_tokens} tokens")
    s = timing.Stamps()
    model.generate(prompt(), max_new_tokens=args.new_tokens, steps_per_call=chunk,
                   stream=lambda step, tok: s.token())
    streams.append(s)
  return timing.per_request(plain, streams, args.new_tokens, chunk, args.batch)


def _eos_requests(model, prompt, args) -> dict:
  """Issue 17's EOS target, in one process: a request whose row ends at EOS after n tokens against
  requests of n and n + 16 tokens without EOS, on one prompt. The EOS token is the first token of the
  prompt's sampled answer (temperature 1, seed 0: random weights answer greedily with one token over
  and over), at or after `--eos-at`, that did not come earlier (batch 1); the model's
  `config.eos_token_ids` is set to it for the EOS requests and back to none for the others (each
  setting compiled before timing). Medians over `--repeats`."""
  if args.batch != 1:
    raise ValueError("--eos-at measures batch 1 (every row would need its own EOS)")
  ids = prompt()
  no_eos = model.config
  sample = dict(temperature=1.0, seed=0)
  ref = model.generate(ids, max_new_tokens=args.new_tokens, **sample)[0]
  at = next((i for i in range(args.eos_at - 1, len(ref) - 16) if ref[i] not in ref[:i]), None)
  if at is None:
    return {"eos_at": None, "eos_requests": 1,
            "eos_note": f"no new token at or after {args.eos_at} in the sampled answer"}
  n, with_eos = at + 1, dataclasses.replace(no_eos, eos_token_ids=(int(ref[at]),))

  def timed(cfg, max_new):
    model.config = cfg
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new, **sample)
    return time.perf_counter() - t, out.shape[1]

  timed(with_eos, args.new_tokens)  # compiles the EOS program
  runs = {"eos": [], "n": [], "n16": []}
  lengths = []
  for _ in range(args.repeats):
    t, length = timed(with_eos, args.new_tokens)
    runs["eos"].append(t)
    lengths.append(length)
    runs["n"].append(timed(no_eos, n)[0])
    runs["n16"].append(timed(no_eos, n + 16)[0])
  model.config = no_eos
  ms = {k: 1e3 * float(np.median(v)) for k, v in runs.items()}
  step_ms = (ms["n16"] - ms["n"]) / 16  # a decode step, from two whole requests of the same prompt
  return {"eos_at": n, "eos_requests": 2 + 3 * args.repeats, "eos_lengths": lengths, "eos_request_ms": ms["eos"],
          "request_ms_n": ms["n"],
          "request_ms_n_plus_16": ms["n16"], "eos_step_ms": step_ms,
          "eos_extra_steps": (ms["eos"] - ms["n"]) / step_ms if step_ms > 0 else None,
          # Judged only where every EOS request did end at n (a swapping policy's answer can change
          # between requests, and with it where the EOS token comes).
          "eos_within_target": ms["eos"] <= ms["n16"] if all(length == n for length in lengths) else None}


def _trace_request(model, prompt, args, tag: str) -> str | None:
  """A profiler trace of one plain request at `args.trace_dir/request_<tag>.json.gz`
  (`profile_prefill.trace_to`; `profile_prefill.py --summarize` reads it)."""
  import jax
  import profile_prefill

  tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag.replace("%", "pct"))
  return profile_prefill.trace_to(os.path.join(args.trace_dir, f"request_{tag}.json.gz"), lambda: jax.block_until_ready(
      model.generate(prompt(), max_new_tokens=args.new_tokens, steps_per_call=args.steps_per_call)))


def _stage_bandwidth(model, n=None, repeats=8) -> float | None:
  """Bytes/s of the executor's staging path (host store -> device, one batched operation, synchronised)
  for `n` experts (default: a commit's writes, `max_writes`), or None without swaps."""
  import jax

  ex = model.residency.executor if model.residency is not None else None
  if ex is None:
    return None
  from swapmoe_jax.serving.swap import SlotWrite

  n = ex.max_writes if n is None else n
  pairs = [(l % ex.store.num_layers, (3 * l) % ex.store.num_experts) for l in range(n)]
  if hasattr(ex.store, "stage_rows"):
    stage = lambda: ex.store.stage_rows(pairs)  # noqa: E731
  elif n <= ex.max_writes:  # a sharded store: staged per write, to the slot's owner
    stage = lambda: ex.stage([SlotWrite(l, 0, e, -1) for l, e in pairs])  # noqa: E731
  else:
    return None
  times = []
  for _ in range(repeats + 1):
    t = time.perf_counter()
    jax.block_until_ready(stage())
    times.append(time.perf_counter() - t)
  return n * ex.store.expert_bytes / float(np.median(times[1:]))


def run_one(args) -> dict:
  """One run (see the module docstring), in this process."""
  import jax
  import jax.numpy as jnp

  import random_model
  from shapes import SHAPES
  from swapmoe_jax.moe import router as router_lib
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import loader, sharding, swap

  router_lib.ROUTER_SUM_ON_GPU = not args.router_dot
  policy, budget, staging = (args.run.split(":") + [loader.DEFAULT_STAGING])[:3]
  policy, _, option = policy.partition("@")  # selective@0.1 (threshold), fallback@4 (bits)
  if option and policy not in ("selective", "fallback"):
    raise ValueError(f"{args.run}: only selective@THRESHOLD and fallback@BITS take an option")
  if policy == "selective" and option:
    args.selective_threshold = float(option)
  if policy == "fallback" and option:
    args.fallback_bits = int(option)
  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))  # never stop early
  dbytes = jnp.dtype(loader.DTYPES[args.dtype]).itemsize
  common = {"shape": args.shape, "dtype": args.dtype, "policy": policy, "budget": budget, "batch": args.batch,
            "src_len": args.src_len, "new_tokens": args.new_tokens}
  if option:
    common["run"] = args.run
  if policy == "transfer":
    import bench_transfer

    cpu = jax.devices()[0].platform == "cpu"  # a 4096² matmul chain takes minutes there
    return common | bench_transfer.measure((cfg.d_model, cfg.d_ff), args.dtype, compute_n=256 if cpu else 4096,
                                           big_mb=16 if cpu else 512)
  n_dev = 1 if args.devices is None else args.devices
  full_bytes = budget_lib.full_model_bytes(cfg, dbytes, n_dev)  # per device
  if policy in ("hf", "accelerate"):
    import peers

    return peers.run_peer(policy, budget, cfg, args.dtype, args.batch, args.src_len, args.new_tokens, args.repeats,
                          full_bytes) | common
  mesh = None if args.devices is None else sharding.expert_mesh(args.devices)
  devices = [jax.devices()[0]] if mesh is None else sharding.mesh_devices(mesh)
  t0 = time.perf_counter()
  dev = devices[0]

  def mem(key):  # the largest figure over the devices (None where the platform has no memory stats)
    figures = [(d.memory_stats() or {}).get(key) for d in devices]
    return None if None in figures else max(figures)

  staging = loader.resolve_staging(staging, cfg, dbytes, mesh=mesh)  # recorded as what ran
  built = random_model.build(cfg, args.dtype, policy, budget, batch=args.batch, src_len=args.src_len,
                             new_tokens=args.new_tokens, update_every=args.update_every, max_swaps=args.max_swaps,
                             pool=args.pool or cfg.num_experts, mesh=mesh, steps_per_call=args.steps_per_call,
                             staging=staging,
                             **({} if args.selective_threshold is None else
                                {"selective_threshold": args.selective_threshold}),
                             **({} if args.hysteresis is None or policy not in swap.IMPORTANCE_POLICIES else
                                {"hysteresis": args.hysteresis}),
                             **({} if args.prefill_refit is None else {"prefill_refit": args.prefill_refit}),
                             **({} if args.prompt_residency is None or policy not in swap.IMPORTANCE_POLICIES else
                                {"prompt_residency": args.prompt_residency == "on"}),
                             **({"selective_encoder": False} if policy == "selective" and args.selective_encoder == "off"
                                else {}),
                             **({} if args.drain is None else {"swap_between_requests": args.drain == "on"}),
                             fallback_bits=args.fallback_bits)
  model, plan, store, budget_bytes = built.model, built.plan, built.store, built.budget_bytes
  if args.no_skip_finished:
    model.skip_finished = False
  jax.block_until_ready(model._slots.leaves)
  setup_s = time.perf_counter() - t0
  peak_after_load, in_use_after_load = mem("peak_bytes_in_use"), mem("bytes_in_use")
  rng = np.random.default_rng(1)
  if args.prompt_pool:  # the same N prompts in turn: each request changes "task", every token known
    pool = itertools.cycle([random_model.random_prompts(rng, cfg, args.batch, args.src_len)[0]
                            for _ in range(args.prompt_pool)])
    prompt = lambda: next(pool)  # noqa: E731
  else:
    prompt = lambda: random_model.random_prompts(rng, cfg, args.batch, args.src_len)[0]  # noqa: E731
  model.generate(prompt(), max_new_tokens=args.new_tokens)  # warm-up: compilation
  model.generate(prompt(), max_new_tokens=args.new_tokens, stream=lambda step, tok: None)
  for _ in range(args.warmup):  # a policy's state after many requests (lfu's counts, swapmoe's scores)
    model.generate(prompt(), max_new_tokens=args.new_tokens)
  ex = model.residency.executor if model.residency is not None else None
  swapped_before = ex.experts_written if ex is not None else 0
  tele0 = model.stats.summary() if model.stats is not None else {}
  timed = _timed_generates(model, prompt, args)
  swapped = (ex.experts_written if ex is not None else 0) - swapped_before
  tele1 = model.stats.summary() if model.stats is not None else {}
  # Expert bytes the timed requests read from host memory (exact/selective), per request: issue 18's
  # floor for a request is full's time + 1.2 x these bytes / the pinned bandwidth (`stage_bandwidth_8`).
  timed_host_bytes = (tele1.get("bytes_from_host", 0) - tele0.get("bytes_from_host", 0)) / (2 * args.repeats)
  eos = _eos_requests(model, prompt, args) if args.eos_at else {}
  if args.trace_dir:  # one more plain request, traced (host threads and GPU streams), after the timed ones
    _trace_request(model, prompt, args, f"{policy}{'@' + option if option else ''}_{budget}_{staging}")
  peak = mem("peak_bytes_in_use")
  peak_per_device = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  tele = model.stats.summary() if model.stats is not None else {}
  # Tokens decoded by the timed requests: per repeat, a plain and a streamed request.
  decoded = args.repeats * 2 * args.new_tokens
  return common | timed | eos | {
      "slots_per_layer": list(plan.slots_per_layer), "steps_per_call": args.steps_per_call, "staging": staging,
      "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default"),
      "update_every": args.update_every, "max_swaps": args.max_swaps,
      "budget_bytes": budget_bytes, "planned_bytes": plan.breakdown.total, "full_model_bytes": full_bytes,
      "peak_device_bytes": peak, "peak_after_load": peak_after_load, "in_use_after_load": in_use_after_load,
      "setup_s": setup_s, "device": dev.device_kind, "platform": dev.platform, "devices": len(devices),
      "peak_per_device": peak_per_device,
      "redirect_rate": tele.get("redirect_rate"), "experts_swapped": tele.get("experts_swapped"),
      "hit_rate": tele.get("hit_rate"), "misses": tele.get("misses"), "from_bank": tele.get("from_bank"),
      # Expert weights read from host memory (exact/selective), over every request this process ran
      # (2 warm-ups and 2 per repeat): the transfer floor of issue 18 is bytes / requests / pinned bandwidth.
      "missed_experts": tele.get("missed_experts"), "bytes_from_host": tele.get("bytes_from_host"),
      "requests_run": 2 + args.warmup + 2 * args.repeats + bool(args.trace_dir) + eos.get("eos_requests", 0),
      "warmup": args.warmup,
      "host_bytes_per_timed_request": timed_host_bytes,
      "tokens_routed": tele.get("tokens_routed"), "selective_threshold": args.selective_threshold if policy == "selective" else None,
      "hysteresis": args.hysteresis,
      "swap_between_requests": model.residency.swap_between_requests if model.residency is not None else None,
      "skip_finished": model.skip_finished,
      "prompt_residency": model.residency.prompt_residency if model.residency is not None else None,
      "prompt_pins": model.residency.prompt_pins if model.residency is not None else None,
      "prompt_pool": args.prompt_pool,
      "selective_encoder": model.selective_encoder if policy == "selective" else None,
      "prefill_refit": args.prefill_refit,
      "fallback_bits": args.fallback_bits if policy == "fallback" else None,
      "refits": model.residency.refits if model.residency is not None else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "router_logits": "dot" if args.router_dot else "auto",
      "swaps_per_token": swapped / decoded, "expert_bytes": store.expert_bytes,
      "stage_bandwidth": _stage_bandwidth(model), "stage_bandwidth_8": _stage_bandwidth(model, 8),
  }


def _versions():
  import jax

  import flax
  return {"jax": jax.__version__, "flax": flax.__version__}


def _commit():
  if os.environ.get("SWAPMOE_COMMIT"):
    return os.environ["SWAPMOE_COMMIT"]
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).strip()
  except Exception:
    return None


def run_in_subprocesses(runs, out, parallel: int = 1) -> list[dict]:
  """Runs each (label, arguments of this script) in a fresh process, so that the runtime's peak-memory
  counter starts at zero; appends each result, with commit and versions, to `out` as a JSON line.
  `parallel` > 1 runs that many at a time, process i on GPU i (CUDA_VISIBLE_DEVICES).
  Returns the results of the runs that succeeded, in the order of `runs`."""
  # One persistent compilation cache for the runs: runs of the same shape, batch and K (swapmoe and
  # pruned at one budget, lru and lfu) share programs, and compile time is most of a run's set-up.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(out)), ".jax_cache"))
  commit, versions = _commit(), _versions()
  results = [None] * len(runs)
  running = {}  # gpu -> (index, process, start time)
  queue = list(enumerate(runs))
  done = 0
  while queue or running:
    for gpu in range(parallel):
      if gpu not in running and queue:
        i, (label, run_args) = queue.pop(0)
        print(f"[{i + 1}/{len(runs)}] {label} ...", flush=True)
        penv = env if parallel == 1 else dict(env, CUDA_VISIBLE_DEVICES=str(gpu))
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + run_args, env=penv,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[gpu] = (i, proc, time.perf_counter())
    time.sleep(0.2)
    for gpu, (i, proc, t) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[gpu]
      done += 1
      stdout, stderr = proc.communicate()
      line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not line:
        print(f"  [{i + 1}] {runs[i][0]} failed ({proc.returncode}):\n{stderr[-3000:]}", flush=True)
        continue
      row = json.loads(line[-1][7:]) | {"commit": commit, "versions": versions}
      results[i] = row
      print(f"  [{i + 1}] done in {time.perf_counter() - t:.0f} s ({done}/{len(runs)})", flush=True)
      with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
  return [r for r in results if r is not None]


def add_request_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
  """The request shape and swap cadence of every run (shared with bench_multidevice.py)."""
  if several:
    p.add_argument("--batch", type=int, nargs="+", default=[1])
  else:
    p.add_argument("--batch", type=int, default=1)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=0,
                 help="plain requests after the two warm-ups, before the timed ones (a policy's steady state)")
  p.add_argument("--update-every", type=int, default=16)
  p.add_argument("--max-swaps", type=int, default=2)
  p.add_argument("--steps-per-call", type=int, default=16, help="decode steps per device call")
  p.add_argument("--pool", type=int, default=0,
                 help="distinct random experts per layer, repeated to fill it (default 0: every expert distinct, "
                      "as in a real model; 1: broadcast views of one, for quick runs that do not time swaps)")


def _full_row(rows, r) -> dict | None:
  """The `full` run of `rows` with `r`'s shape, dtype and batch, or None."""
  return next((f for f in rows if f["policy"] == "full" and f["shape"] == r["shape"] and f["dtype"] == r["dtype"]
               and f["batch"] == r["batch"]), None)


def print_table(rows) -> None:
  gib = 2**30
  print(f"\n{'shape':<17}{'dt':>5}{'b':>3}{'policy':>14}{'budget':>8}{'plan G':>8}{'peak G':>8}{'ms/tok':>8}"
        f"{'vs full':>8}{'p50':>8}{'p95':>8}{'ttft':>8}{'redir':>7}{'hit':>5}{'sw/tok':>7}")
  for r in rows:
    if r["policy"] == "transfer":
      continue
    full = _full_row(rows, r)
    ratio = r["ms_per_token"] / full["ms_per_token"] if full else float("nan")
    g = lambda k: r[k] / gib if r.get(k) else float("nan")  # noqa: E731
    n = lambda k: float("nan") if r.get(k) is None else r[k]  # noqa: E731
    budget = f"{r['budget_bytes'] / gib:.2f}G" if r.get("budget_bytes") else "-"
    print(f"{r['shape']:<17}{r['dtype'][:4]:>5}{r['batch']:>3}{r.get('run', r['policy']).split(':')[0]:>14}{budget:>8}{g('planned_bytes'):>8.2f}"
          f"{g('peak_device_bytes'):>8.2f}{n('ms_per_token'):>8.3f}{ratio:>8.2f}{n('stream_p50_ms'):>8.3f}"
          f"{n('stream_p95_ms'):>8.3f}{n('prefill_ms'):>8.1f}{(r.get('redirect_rate') or 0) * 100:>6.1f}%"
          f"{(r.get('hit_rate') or 0) * 100:>4.0f}%{r.get('swaps_per_token') or 0:>7.2f}")
  for r in rows:  # exact reads from host memory against issue 18's floor
    full = _full_row(rows, r)
    bw = r.get("stage_bandwidth_8")
    if r.get("host_bytes_per_timed_request") and full and full.get("request_ms") and bw:
      floor = full["request_ms"] + 1.2e3 * r["host_bytes_per_timed_request"] / bw
      print(f"{r.get('run', r['policy']).split(':')[0]} at {r['budget']}: {r['request_ms']:.1f} ms a request, reading "
            f"{r['host_bytes_per_timed_request'] / 1e9:.2f} GB from host memory at {bw / 1e9:.1f} GB/s pinned: "
            f"floor full + 1.2 x transfer = {floor:.1f} ms ({r['request_ms'] / floor:.2f}x the floor)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", nargs="+", default=["switch-base-8"])
  p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
  p.add_argument("--runs", nargs="+", default=["full:none", "swapmoe:50%"],
                 help="policy:budget pairs, optionally :staging (pageable, transfer or gather; see `load`), "
                      "peers (hf:none, accelerate:33%%), transfer:none")
  add_request_arguments(p, several=True)
  p.add_argument("--devices", type=int, help="split the experts over the first N devices (expert parallelism, "
                                             "swapmoe_jax/serving/sharding.py); budgets are then per device")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time, one per GPU")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))
  p.add_argument("--selective-threshold", type=float, default=None,
                 help="policy selective's threshold (default: the loader's)")
  p.add_argument("--selective-encoder", choices=["on", "off"], default="on",
                 help="off: policy selective redirects the encoder's misses (load's selective_encoder)")
  p.add_argument("--hysteresis", type=float, default=None, help="swapmoe's hysteresis (default: the loader's)")
  p.add_argument("--drain", choices=["on", "off"], default=None,
                 help="load's swap_between_requests: at a request's end, issue the controller's remaining swaps "
                      "(default: the loader's, on for encoder-decoder models)")
  p.add_argument("--no-drain", dest="drain", action="store_const", const="off", help="--drain off")
  p.add_argument("--prefill-refit", type=float, default=None, help="load's prefill_refit (swapmoe and kin)")
  p.add_argument("--fallback-bits", type=int, default=8, choices=[4, 8], help="policy fallback's copies")
  p.add_argument("--prompt-residency", nargs="?", choices=["on", "off"], const="on", default=None,
                 help="load's prompt_residency (swapmoe and kin; default: the loader's, on for swapmoe on Switch)")
  p.add_argument("--prompt-pool", type=int, default=0,
                 help="draw each request's prompt from N fixed random prompts in turn (default 0: a new one "
                      "each time), so that prompt residency knows every token and each request changes task")
  p.add_argument("--no-skip-finished", action="store_true",
                 help="every step of a call runs the model (no per-step lax.cond; `decode.decode_steps`)")
  p.add_argument("--eos-at", type=int, default=0,
                 help="also time one prompt ending at EOS after about N tokens against requests of n and n + 16 "
                      "tokens without EOS (issue 17's EOS target; batch 1)")
  p.add_argument("--trace-dir", help="also trace one request of each run (after the timed ones) into this folder")
  p.add_argument("--router-dot", action="store_true", help="router logits as a HIGHEST matmul on the GPU too "
                 "(the library before `router.ROUTER_SUM_ON_GPU`), for side-by-side runs")
  p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run in this process
  args = p.parse_args(argv)
  if args.run:
    args.shape, args.dtype, args.batch = args.shape[0], args.dtype[0], args.batch[0]
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return 0
  common = ["--src-len", str(args.src_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--update-every", str(args.update_every), "--max-swaps", str(args.max_swaps),
            "--steps-per-call", str(args.steps_per_call), "--warmup", str(args.warmup)] + (["--devices", str(args.devices)] if args.devices else []) + (
                [] if args.selective_threshold is None else ["--selective-threshold", str(args.selective_threshold)]) + (
                [] if args.hysteresis is None else ["--hysteresis", str(args.hysteresis)]) + (
                ["--selective-encoder", args.selective_encoder]) + (
                [] if args.drain is None else ["--drain", args.drain]) + (
                ["--no-skip-finished"] if args.no_skip_finished else []) + (
                [] if args.prompt_residency is None else ["--prompt-residency", args.prompt_residency]) + (
                ["--prompt-pool", str(args.prompt_pool)] if args.prompt_pool else []) + (
                ["--eos-at", str(args.eos_at)] if args.eos_at else []) + (
                [] if args.prefill_refit is None else ["--prefill-refit", str(args.prefill_refit)]) + (
                [] if args.trace_dir is None else ["--trace-dir", os.path.abspath(args.trace_dir)]) + [
                "--fallback-bits", str(args.fallback_bits)] + (["--router-dot"] if args.router_dot else [])
  runs = []
  for shape in args.shape:
    for dtype in args.dtype:
      for batch in args.batch:
        for run in args.runs:
          if run.startswith("transfer:") and (dtype, batch) != (args.dtype[0], args.batch[0]):
            continue  # once per shape
          runs.append((f"{shape} {dtype} batch {batch} {run}",
                       ["--run", run, "--shape", shape, "--dtype", dtype, "--batch", str(batch)] + common))
  rows = run_in_subprocesses(runs, args.out, args.parallel)
  print_table(rows)
  return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
  sys.exit(main())
