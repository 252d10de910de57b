"""Decode latency and peak device memory of each policy under a budget, side by side in one run.

  python benchmarks/bench_decode.py --shape switch-base-64 --dtype bfloat16 \\
      --runs full:none swapmoe:33% lru:33% pruned:33% --batch 1 --src-len 128 --new-tokens 64

Each run is a fresh subprocess (so that the runtime's peak-memory counter starts at zero) that builds
the shape with random weights (speed and memory do not depend on the values), plans for the budget,
generates `--new-tokens` tokens greedily for `--repeats` prompts, and reports per-token latency p50/p95
(one host sync per token, the same for every policy), prefill time, tokens/s, the measured peak device
memory against the budget, and the policy's telemetry. Results: a table on stdout and JSON lines
appended to `--out` (commit, device, versions, config, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_model_parts(cfg, dtype, seed=0, pool=4):
  """A dense tree in the checkpoint layout and per-layer experts, random (a pool of `pool` random
  experts tiled over E, to keep host set-up fast; routing uses the random routers)."""
  import ml_dtypes  # noqa: F401  (numpy bfloat16)

  rng = np.random.default_rng(seed)
  npdt = np.dtype(dtype)

  def r(*shape, std=0.05):
    return (rng.standard_normal(shape, np.float32) * std).astype(npdt)

  d, hc, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
  dense = {}
  if cfg.tie_word_embeddings:
    dense["shared"] = r(cfg.vocab_size, d, std=1.0)
  experts, norms = [], []
  for stack, n, sparse in (("encoder", cfg.num_layers, cfg.encoder_sparse_layers),
                           ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_layers)):
    blocks = {}
    for i in range(n):
      b = {"attn_norm": np.ones(d, npdt), "attn": {k: r(d, hc) for k in "qkv"} | {"o": r(hc, d)},
           "ffn_norm": np.ones(d, npdt)}
      if stack == "decoder":
        b["cross_norm"] = np.ones(d, npdt)
        b["cross"] = {k: r(d, hc) for k in "qkv"} | {"o": r(hc, d)}
      if i in sparse:
        b["router"] = {"w": r(d, cfg.num_experts, std=1.0)}
        base_wi, base_wo = r(pool, d, f), r(pool, f, d)
        idx = np.arange(cfg.num_experts) % pool
        experts.append((base_wi[idx], base_wo[idx]))
        norms.append(rng.uniform(1.0, 2.0, cfg.num_experts).astype(np.float32))
      else:
        b["mlp"] = {"wi": r(d, f), "wo": r(f, d)}
      blocks[str(i)] = b
    dense[stack] = {"rel_bias": r(cfg.relative_attention_num_buckets, cfg.num_heads, std=1.0),
                    "final_norm": np.ones(d, npdt), "blocks": blocks}
  return dense, experts, np.stack(norms)


def run_one(args) -> dict:
  """One policy at one budget, in this process."""
  import jax
  import jax.numpy as jnp

  from shapes import SHAPES
  from swapmoe_jax import budget as budget_lib
  from swapmoe_jax import decode, loader
  from swapmoe_jax import planner as planner_lib
  from swapmoe_jax import sharding
  from swapmoe_jax.store import HostExpertStore

  policy, budget = args.run.split(":")
  mesh = None if args.devices is None else sharding.expert_mesh(args.devices)
  devices = [jax.devices()[0]] if mesh is None else sharding.mesh_devices(mesh)
  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))  # never stop early
  jdtype = loader.DTYPES[args.dtype]
  dbytes = jnp.dtype(jdtype).itemsize
  t0 = time.perf_counter()
  dense, experts, norms = random_model_parts(cfg, args.dtype)
  if mesh is None:
    store = HostExpertStore.from_numpy(experts, norms, jdtype)
  else:
    store = sharding.ShardedExpertStore.from_numpy(experts, norms, jdtype, mesh)
  del experts
  full_bytes = budget_lib.full_model_bytes(cfg, dbytes, len(devices))  # per device
  shape = dict(batch=args.batch, src_len=args.src_len, tgt_len=decode.cache_length(args.new_tokens))
  budget_bytes = None if budget == "none" else budget_lib.parse_budget(budget).resolve(full_bytes)
  if policy == "full":
    plan = planner_lib.plan_full(cfg, budget_bytes, dbytes, **shape, devices=len(devices))
  else:
    plan = planner_lib.plan_uniform(cfg, budget_bytes, dbytes, **shape, update_every=args.update_every,
                                    max_swaps_per_step=args.max_swaps, devices=len(devices))
  dev = devices[0]

  def mem(key):  # the largest figure over the devices (None where the platform has no memory stats)
    figures = [(d.memory_stats() or {}).get(key) for d in devices]
    return None if None in figures else max(figures)

  model = loader.assemble(cfg, dense, store, plan, policy=policy, gate_mode="original", dtype=jdtype, mesh=mesh)
  jax.block_until_ready(model._slots.leaves)
  setup_s = time.perf_counter() - t0
  peak_after_load, in_use_after_load = mem("peak_bytes_in_use"), mem("bytes_in_use")
  rng = np.random.default_rng(1)
  prompt = lambda: rng.integers(2, cfg.vocab_size, (args.batch, args.src_len))  # noqa: E731
  model.generate(prompt(), max_new_tokens=args.new_tokens)  # warm-up: compilation
  model.generate(prompt(), max_new_tokens=1)
  per_token, prefill, lat = [], [], []
  for _ in range(args.repeats):
    # Throughput: the loop runs ahead of the device (one host sync per 8 steps for the EOS check).
    ids = prompt()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.new_tokens)
    t2 = time.perf_counter()
    prefill.append(t1 - t)
    per_token.append(((t2 - t1) - (t1 - t)) / (args.new_tokens - 1))
    # Streaming: each token reaches the host before the next step is issued (per-token latency).
    stamps = []
    model.generate(prompt(), max_new_tokens=args.new_tokens, stream=lambda step, tok: stamps.append(time.perf_counter()))
    lat.extend(np.diff(stamps))
  peak = mem("peak_bytes_in_use")
  peak_per_device = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  lat = np.asarray(lat)
  tele = model.stats.summary() if model.stats is not None else {}
  return {
      "shape": args.shape, "dtype": args.dtype, "policy": policy, "budget": budget, "batch": args.batch,
      "src_len": args.src_len, "new_tokens": args.new_tokens, "slots_per_layer": list(plan.slots_per_layer),
      "budget_bytes": budget_bytes, "planned_bytes": plan.breakdown.total, "full_model_bytes": full_bytes,
      "peak_device_bytes": peak, "peak_after_load": peak_after_load, "in_use_after_load": in_use_after_load,
      "ms_per_token": 1e3 * float(np.median(per_token)),
      "stream_p50_ms": 1e3 * float(np.median(lat)), "stream_p95_ms": 1e3 * float(np.percentile(lat, 95)),
      "prefill_ms": 1e3 * float(np.median(prefill)), "tokens_per_s": args.batch / float(np.median(per_token)),
      "setup_s": setup_s, "device": dev.device_kind, "platform": dev.platform, "devices": len(devices),
      "peak_per_device": peak_per_device,
      "redirect_rate": tele.get("redirect_rate"), "experts_swapped": tele.get("experts_swapped"),
      "hit_rate": tele.get("hit_rate"), "misses": tele.get("misses"),
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


def run_in_subprocesses(runs, out) -> list[dict]:
  """Runs each (label, arguments of this script) in a fresh process, so that the runtime's peak-memory
  counter starts at zero; appends each result, with commit and versions, to `out` as a JSON line.
  Returns the results of the runs that succeeded."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  rows = []
  for label, run_args in runs:
    t = time.perf_counter()
    print(f"[{len(rows) + 1}/{len(runs)}] {label} ...", flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + run_args, env=env, capture_output=True,
                          text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"  failed ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
      continue
    row = json.loads(line[-1][7:]) | {"commit": _commit(), "versions": _versions()}
    rows.append(row)
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")
  return rows


def add_request_arguments(p: argparse.ArgumentParser) -> None:
  """The request shape and swap cadence of every run (shared with bench_multidevice.py)."""
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--update-every", type=int, default=16)
  p.add_argument("--max-swaps", type=int, default=2)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="switch-base-8")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--runs", nargs="+", default=["full:none", "swapmoe:50%"], help="policy:budget pairs")
  add_request_arguments(p)
  p.add_argument("--devices", type=int, help="split the experts over the first N devices (expert parallelism, "
                                             "swapmoe_jax/sharding.py); budgets are then per device")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))
  p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run in this process
  args = p.parse_args(argv)
  if args.run:
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return 0
  passed = [a for a in (argv or sys.argv[1:]) if a not in args.runs and a != "--runs"]
  rows = run_in_subprocesses([(f"{args.shape} {run}", ["--run", run] + passed) for run in args.runs], args.out)
  full = next((r for r in rows if r["policy"] == "full"), None)
  gib = 2**30
  print(f"\n{'policy':<9}{'budget':>8}{'plan GiB':>9}{'peak GiB':>9}{'load pk':>8}{'ms/tok':>8}{'vs full':>8}"
        f"{'str p50':>8}{'str p95':>8}{'prefill':>8}{'redirect':>9}{'hit':>6}{'swaps':>7}")
  for r in rows:
    ratio = r["ms_per_token"] / full["ms_per_token"] if full else float("nan")
    g = lambda k: r[k] / gib if r.get(k) else float("nan")  # noqa: E731
    budget = f"{r['budget_bytes'] / gib:.2f}G" if r["budget_bytes"] else "-"
    print(f"{r['policy']:<9}{budget:>8}{r['planned_bytes'] / gib:>9.2f}{g('peak_device_bytes'):>9.2f}"
          f"{g('peak_after_load'):>8.2f}{r['ms_per_token']:>8.3f}{ratio:>8.2f}{r['stream_p50_ms']:>8.3f}"
          f"{r['stream_p95_ms']:>8.3f}{r['prefill_ms']:>8.1f}{(r['redirect_rate'] or 0) * 100:>8.1f}%"
          f"{(r['hit_rate'] or 0) * 100:>5.0f}%{r['experts_swapped'] or 0:>7}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
