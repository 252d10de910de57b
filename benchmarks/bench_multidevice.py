"""Expert parallelism: one device against several, at the same per-device budget.

  PYTHONPATH=. python benchmarks/bench_multidevice.py --shape switch-base-128 --dtype bfloat16 --devices 2

Runs, each in a fresh process through `bench_decode.py` (random weights, greedy decoding, batch 1,
128-token input, 64 new tokens by default):
  full on 1 device (every expert resident, where it fits), then each `--policies` policy at the
  per-device budget on 1 device and on `--devices` devices, and full on `--devices` devices (half the
  experts on each of two: the cost of the collectives alone).
The per-device budget is `--budget` (e.g. '4GiB'), or by default the bytes that hold everything but
the experts plus `--expert-share` of all experts on one device: the same bytes on every device, so
n devices hold n times as many slots. Prints a markdown table (per-token latency p50 with the loop
running ahead, streaming p50 with a host sync per token, peak memory per device from
`memory_stats()['peak_bytes_in_use']`) and appends JSON lines to `--out`.

On the CPU, simulated devices stand in (set here with --xla_force_host_platform_device_count):
  PYTHONPATH=. python benchmarks/bench_multidevice.py --shape tiny --devices 2 --new-tokens 16 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_device_budget(cfg, dtype: str, expert_share: float, batch: int, src_len: int, new_tokens: int,
                      max_swaps: int) -> int:
  """Bytes that hold dense weights, caches, staging and workspace, plus `expert_share` of all experts."""
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import decode

  rest = budget_lib.memory_breakdown(cfg, dtype, [0] * cfg.num_moe_layers, batch, src_len,
                                     decode.cache_length(new_tokens), max_swaps).total
  experts = cfg.num_moe_layers * cfg.num_experts * budget_lib.expert_bytes_each(cfg, dtype)
  return rest + int(expert_share * experts)


def markdown_table(rows) -> str:
  unit, size = ("GiB", 2**30) if max(r["planned_bytes"] for r in rows) >= 2**30 else ("MiB", 2**20)
  g = lambda v: "—" if v is None else f"{v / size:.2f}"  # noqa: E731
  out = [f"| devices | policy | budget / device {unit} | K per layer | planned / device {unit} | peak / device {unit} "
         "| ms/token | stream p50 ms | stream p95 ms | prefill ms | redirected | hit rate | swaps |",
         "|---" * 13 + "|"]
  for r in rows:
    peaks = r.get("peak_per_device") or [None]
    peak = "—" if None in peaks else " / ".join(g(p) for p in peaks)
    out.append(f"| {r['devices']} | {r['policy']} | {g(r['budget_bytes'])} | {r['slots_per_layer'][0]} "
               f"| {g(r['planned_bytes'])} | {peak} | {r['ms_per_token']:.3f} | {r['stream_p50_ms']:.3f} "
               f"| {r['stream_p95_ms']:.3f} | {r['prefill_ms']:.1f} | {(r['redirect_rate'] or 0) * 100:.1f} % "
               f"| {(r['hit_rate'] or 0) * 100:.0f} % | {r['experts_swapped'] or 0} |")
  return "\n".join(out)


def main(argv=None):
  import bench_decode

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="switch-base-128")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--devices", type=int, default=2, help="devices of the expert-parallel runs")
  p.add_argument("--policies", nargs="+", default=["swapmoe"], help="policies run under the budget")
  p.add_argument("--budget", help="per-device budget, e.g. '4GiB' (default: from --expert-share)")
  p.add_argument("--expert-share", type=float, default=0.25,
                 help="default budget: everything but the experts, plus this share of all experts")
  bench_decode.add_request_arguments(p)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))
  args = p.parse_args(argv)

  # Only the CPU backend reads this flag: on the CPU it provides the simulated devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(args.devices, 1)}").strip()
  from shapes import SHAPES
  from swapmoe_jax.serving import budget as budget_lib

  cfg = SHAPES[args.shape]
  if args.budget:
    budget = budget_lib.parse_budget(args.budget).resolve(budget_lib.full_model_bytes(cfg, args.dtype))
  else:
    budget = per_device_budget(cfg, args.dtype, args.expert_share, args.batch, args.src_len, args.new_tokens,
                               args.max_swaps)
  common = ["--shape", args.shape, "--dtype", args.dtype, "--batch", str(args.batch), "--src-len",
            str(args.src_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--update-every", str(args.update_every), "--max-swaps", str(args.max_swaps),
            "--steps-per-call", str(args.steps_per_call)]
  runs = [("full", "none", 1)] + [(policy, str(budget), n) for n in (1, args.devices) for policy in args.policies]
  runs.append(("full", "none", args.devices))
  rows = bench_decode.run_in_subprocesses(
      [(f"{args.shape} {policy}:{b} on {n} device(s)",
        ["--run", f"{policy}:{b}"] + (["--devices", str(n)] if n > 1 else []) + common)  # 1: no mesh at all
       for policy, b, n in runs], args.out)
  print(f"\n{args.shape} {args.dtype}, batch {args.batch}, {args.src_len}-token input, {args.new_tokens} new "
        f"tokens, per-device budget {budget_lib.format_bytes(budget)} ({budget} bytes), "
        f"device {rows[0]['device'] if rows else '?'}\n")
  print(markdown_table(rows))
  return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
  sys.exit(main())
