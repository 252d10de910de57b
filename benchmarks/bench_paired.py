"""Whole requests of several policies interleaved in one process, with paired 95 % intervals on their
ratios: the measurement behind "`swapmoe` at 33 % costs at most 1.05x `full` per request".

  python benchmarks/bench_paired.py --shape switch-base-64 --dtype bfloat16 --runs full:none swapmoe:33% \\
      --rounds 40 --warmup 8

`bench_decode.py` runs each policy in a process of its own, so that each peak-memory reading starts from
zero; but `full` itself moved by ±5 % between invocations of one device call, and `swapmoe`'s ratio to it
moved 1.01-1.15x between runs of the same code (RESULTS.md), so one ratio of two invocations cannot tell
1.04x from 1.10x. Here every model is built in one process from the same random weights (every expert
distinct), and each round runs one request of each on the same prompt, in an order that alternates from
round to round, so that the machine's drift falls on all of them alike.

A request is timed from the call until the device has finished all the work it issued: `generate`
returns with its tokens, and the swaps that `swapmoe` issues at a request's end (its drain between
requests) may still be landing then, which in a stream of requests delays the next one. Counting them in
the request that issued them is what a stream of that policy's requests pays, and keeps the next
request, of another model, clean. The tail after `generate` returned is reported on its own (on one
H200, 0.1-0.2 ms for every policy: the drain had landed by the time `generate` returned).

Spec of a run: POLICY:BUDGET[:STAGING[:KEY=VALUE,...]], e.g. `swapmoe:33%`, `swapmoe:33%:transfer`,
`swapmoe:33%::hysteresis=1.0,swap_between_requests=False` (keyword arguments of `loader.assemble`;
`residency.NAME=VALUE` sets an attribute of the loaded model's residency instead).
Reports per run the median request time and tail, experts swapped per request, and against the first
run the ratio of mean request times with its 95 % interval from a bootstrap over rounds (rounds
resampled whole, so each request stays paired with the others of its round), over all rounds and over
their last half (a policy still learning — prompt residency knows more tokens as requests pass — has a
trend that the mean hides: RESULTS.md, "Batch 8 paired"); appends one JSON row per run to --out.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_run(spec: str) -> tuple[str, str, str | None, dict]:
  """'swapmoe:33%:gather:hysteresis=1.0' -> ('swapmoe', '33%', 'gather', {'hysteresis': 1.0})."""
  parts = spec.split(":")
  if len(parts) < 2:
    raise SystemExit(f"error: run {spec!r} is not POLICY:BUDGET[:STAGING[:KEY=VALUE,...]]")
  options = {}
  for item in (parts[3].split(",") if len(parts) > 3 and parts[3] else []):
    key, _, value = item.partition("=")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise SystemExit(f"error: option {item!r} of run {spec!r} is not KEY=VALUE with a Python literal") from None
  return parts[0], parts[1], (parts[2] or None) if len(parts) > 2 else None, options


def ratio_interval(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
  """mean(b) / mean(a) over paired rounds, with its 95 % bootstrap interval (rounds resampled whole)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(a), (resamples, len(a)))
  ratios = b[idx].mean(axis=1) / a[idx].mean(axis=1)
  return float(b.mean() / a.mean()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="switch-base-64")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--runs", nargs="+", default=["full:none", "swapmoe:33%"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--rounds", type=int, default=40, help="timed rounds (one request of each run per round)")
  p.add_argument("--warmup", type=int, default=8, help="untimed rounds after compilation (each policy's steady state)")
  p.add_argument("--pool", type=int, default=0, help="distinct random experts per layer (default: all distinct)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "requests.jsonl"))
  p.add_argument("--note", default="")
  args = p.parse_args(argv)
  runs = [parse_run(s) for s in args.runs]

  import jax

  import random_model
  import shapes
  from swapmoe_jax.serving import loader

  cfg = shapes.SHAPES[args.shape]
  t0 = time.perf_counter()
  parts = random_model.random_model_parts(cfg, args.dtype, pool=args.pool or cfg.num_experts)
  print(f"random weights: {time.perf_counter() - t0:.0f} s", flush=True)
  models = []
  for (policy, budget, staging, options), spec in zip(runs, args.runs):
    t0 = time.perf_counter()
    kw = dict({k: v for k, v in options.items() if not k.startswith("residency.")},
              **({"staging": staging} if staging else {}))
    built = random_model.build(cfg, args.dtype, policy, budget, batch=args.batch, src_len=args.src_len,
                               new_tokens=args.new_tokens, parts=parts, **kw)
    for k, v in options.items():  # residency.NAME=VALUE: an attribute of the model's residency, set after load
      if k.startswith("residency."):
        setattr(built.model.residency, k.split(".", 1)[1], v)
    jax.block_until_ready(built.model._slots.leaves)
    models.append(built.model)
    print(f"built {spec}: {time.perf_counter() - t0:.0f} s", flush=True)
  del parts
  rng = np.random.default_rng(1)

  def request(model, ids) -> tuple[float, float]:
    """(seconds until the device finished everything the request issued, of which after `generate` returned)."""
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.new_tokens)
    back = time.perf_counter()
    jax.block_until_ready(model._slots.leaves)  # the drain's slot writes, the last work a request issues
    end = time.perf_counter()
    if out.shape[1] != args.new_tokens:
      raise RuntimeError(f"a request stopped after {out.shape[1]} of {args.new_tokens} tokens")
    return end - t, end - back

  n = len(models)
  wall, tail, swapped = np.zeros((args.rounds, n)), np.zeros((args.rounds, n)), np.zeros((args.rounds, n))
  total = 2 + args.warmup + args.rounds
  for r in range(-2 - args.warmup, args.rounds):  # two compile rounds, the warm-up, then the timed rounds
    ids = random_model.random_prompts(rng, cfg, args.batch, args.src_len)[0]
    for j in (range(n) if r % 2 == 0 else reversed(range(n))):
      ex = models[j].residency.executor if models[j].residency is not None else None
      before = ex.experts_written if ex is not None else 0
      w, tl = request(models[j], ids)
      if r >= 0:
        wall[r, j], tail[r, j] = w, tl
        swapped[r, j] = (ex.experts_written if ex is not None else 0) - before
    done = r + 3 + args.warmup
    if done % 10 == 0 or done == total:
      print(f"round {done}/{total}", flush=True)

  rows = []
  print(f"\n{args.shape} {args.dtype} batch {args.batch}, {args.src_len} in, {args.new_tokens} out, "
        f"{args.rounds} rounds ({jax.devices()[0].device_kind})")
  print(f"{'run':<44}{'request ms':>11}{'tail ms':>9}{'swaps/req':>10}   × {args.runs[0]} (mean, 95 % CI)"
        f"   last half of the rounds")
  half = args.rounds // 2
  for j, spec in enumerate(args.runs):
    ratio, lo, hi = ratio_interval(wall[:, 0], wall[:, j]) if j else (1.0, 1.0, 1.0)
    # A policy that learns (prompt residency's known tokens, the controller's scores) may not be in its
    # steady state in the first rounds: the last half alone shows a trend that the mean hides.
    late = ratio_interval(wall[half:, 0], wall[half:, j]) if j and args.rounds - half >= 2 else (1.0, 1.0, 1.0)
    row = {"what": "paired", "run": spec, "shape": args.shape, "dtype": args.dtype, "batch": args.batch,
           "src_len": args.src_len, "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
           "request_ms_median": 1e3 * float(np.median(wall[:, j])), "request_ms_mean": 1e3 * float(wall[:, j].mean()),
           "tail_ms_median": 1e3 * float(np.median(tail[:, j])), "swaps_per_request": float(swapped[:, j].mean()),
           "ratio_to_first": ratio, "ratio_ci95": [lo, hi], "first": args.runs[0],
           "ratio_last_half": late[0], "ratio_last_half_ci95": list(late[1:]),
           "swaps": [int(x) for x in swapped[:, j]],
           "request_ms": [round(1e3 * x, 3) for x in wall[:, j]], "device": jax.devices()[0].device_kind,
           "staging": loader.resolve_staging(runs[j][2] or loader.DEFAULT_STAGING, cfg,
                                             np.dtype(loader.DTYPES[args.dtype]).itemsize),
           "commit": os.environ.get("SWAPMOE_COMMIT", ""), "note": args.note}
    rows.append(row)
    print(f"{spec:<44}{row['request_ms_median']:11.2f}{row['tail_ms_median']:9.2f}{row['swaps_per_request']:10.2f}"
          f"   {ratio:.3f} [{lo:.3f}, {hi:.3f}]   {late[0]:.3f} [{late[1]:.3f}, {late[2]:.3f}]")
  with open(args.out, "a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
