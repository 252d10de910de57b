"""Tables and a plot from `bench_decode.py`'s JSON lines: the generated part of `RESULTS.md`.

  python benchmarks/report.py benchmarks/results.jsonl --commit abc1234 --command "python benchmarks/..."

Takes the rows of the given commits (default: the newest row's), later rows replacing earlier ones of
the same configuration, and writes, between the markers `<!-- report:begin -->` and `<!-- report:end -->`
of `--results` (the rest of the file is left as it is; the markers are added at the end if missing):
  * the moonshot targets of the benchmark issue, each with the measured figure and the ratio behind it;
  * per shape, dtype and batch: every policy and peer (budget, planned and measured peak memory,
    ms/token and its ratio to `full`, per-token p50/p95, prefill, tokens/s, redirected tokens, hit
    rate, swaps per token);
  * swaps: the staging bandwidth against the pinned host->device bandwidth, and the share of swap time
    hidden under compute: 1 - (ms/token of swapmoe - ms/token of pruned at the same budget, the same
    work without swaps) / (swaps per token x one expert's staging time).
and a PNG (`--plot`): ms/token against budget, per policy and peer, one panel per shape/dtype/batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
HERE = os.path.dirname(os.path.abspath(__file__))
POLICY_ORDER = ("full", "swapmoe", "pruned", "lru", "lfu", "hf", "accelerate")
PEER_NAMES = {"hf": "HF PyTorch generate (all on GPU)", "accelerate": "HF accelerate CPU offload"}


def load_rows(path: str, commits: list[str] | None = None) -> list[dict]:
  rows = [json.loads(l) for l in open(path) if l.strip()]
  if not rows:
    raise SystemExit(f"error: no rows in {path}")
  commits = commits or [rows[-1].get("commit")]
  latest = {}
  for r in rows:
    if r.get("commit") in commits:
      staging = "default" if _default_staging(r) else r.get("staging")
      key = (r["shape"], r["dtype"], r["batch"], r["policy"], r["budget"], r.get("devices", 1), staging,
             r.get("allocator", "default"), bool(r.get("experiment")))
      latest[key] = r
  if not latest:
    raise SystemExit(f"error: no rows of commits {commits} in {path}")
  return list(latest.values())


def budget_share(r: dict) -> float:
  """The budget as a fraction of the full model (1.0 for none)."""
  if r["budget"] == "none":
    return 1.0
  if r["budget"].endswith("%"):
    return float(r["budget"][:-1]) / 100
  return r["budget_bytes"] / r["full_model_bytes"]


def _groups(rows):
  rows = [r for r in rows if _standard(r)]
  keys = sorted({(r["shape"], r["dtype"], r["batch"]) for r in rows if r["policy"] != "transfer"},
                key=lambda k: (k[0].replace("large", "zlarge"), k[1] != "bfloat16", k[2]))
  for key in keys:
    group = [r for r in rows if (r["shape"], r["dtype"], r["batch"]) == key and r["policy"] != "transfer"]
    group.sort(key=lambda r: (POLICY_ORDER.index(r["policy"]) if r["policy"] in POLICY_ORDER else 99,
                              -budget_share(r)))
    yield key, group


def _default_staging(r) -> bool:
  """Staged the default way of the row's commit: "transfer" until `load` made "pageable" the default
  (rows of A/B runs carry "experiment": true)."""
  return r.get("staging", "transfer") in ("transfer", "pageable") and not r.get("experiment")


def _standard(r) -> bool:
  """One device, the default staging, the default allocator: the runs the tables compare. Expert
  parallelism has its own section; allocator and staging experiments are quoted in the text."""
  return (r.get("devices") or 1) == 1 and _default_staging(r) and r.get("allocator", "default") == "default"


def _find(rows, shape, dtype, batch, policy, budget=None):
  for r in reversed(rows):  # the latest row of a configuration
    if not _standard(r):
      continue
    if (r["shape"], r["dtype"], r["batch"], r["policy"]) == (shape, dtype, batch, policy) and (
        budget is None or r["budget"] == budget):
      return r
  return None


def _transfer(rows, shape):
  return next((r for r in rows if r["policy"] == "transfer" and r["shape"] == shape), None) or next(
      (r for r in rows if r["policy"] == "transfer"), None)


def swap_figures(rows, r) -> dict:
  """Staging bandwidth, its share of the pinned bandwidth, and the share of swap time hidden (see the
  module docstring) for a swapping row `r`."""
  out = {}
  t = _transfer(rows, r["shape"])
  if r.get("stage_bandwidth"):
    out["stage_gbs"] = r["stage_bandwidth"] / 1e9
    if t:
      out["pinned_gbs"] = t["pinned_bandwidth"] / 1e9
      out["stage_share"] = r["stage_bandwidth"] / t["pinned_bandwidth"]
  pruned = _find(rows, r["shape"], r["dtype"], r["batch"], "pruned", r["budget"])
  if pruned and r.get("stage_bandwidth") and r.get("swaps_per_token"):
    swap_ms = 1e3 * r["swaps_per_token"] * r["expert_bytes"] / r["stage_bandwidth"]
    stall = r["ms_per_token"] - pruned["ms_per_token"]
    out["swap_ms_per_token"] = swap_ms
    out["stall_ms_per_token"] = stall
    out["hidden"] = float(np.clip(1 - stall / swap_ms, 0, 1)) if swap_ms > 0 else None
    out["stall_share"] = max(stall, 0.0) / r["ms_per_token"]
  return out


def _g(v, size=2**30, nd=2):
  return "—" if v is None else f"{v / size:.{nd}f}"


def group_table(rows, key, group) -> str:
  shape, dtype, batch = key
  full = _find(rows, shape, dtype, batch, "full")
  out = [f"### {shape}, {dtype}, batch {batch}", "",
         "| policy | budget | K / layer | planned GiB | measured peak GiB | ms/token | vs full | p50 / p95 ms "
         "| prefill ms | tokens/s | redirected | hit rate | swaps / token | steps / call | commit |",
         "|---" * 15 + "|"]
  for r in group:
    name = PEER_NAMES.get(r["policy"], r["policy"] + (" (exact)" if r["policy"] in ("lru", "lfu") else ""))
    budget = "—" if r["budget"] == "none" else f"{_g(r['budget_bytes'])} GiB ({r['budget']})"
    k = r.get("slots_per_layer")
    ratio = f"{r['ms_per_token'] / full['ms_per_token']:.2f}" if full else "—"
    red = "—" if r.get("redirect_rate") is None else f"{100 * r['redirect_rate']:.1f} %"
    hit = "—" if r.get("hit_rate") is None else f"{100 * r['hit_rate']:.0f} %"
    swaps = "—" if r.get("swaps_per_token") is None else f"{r['swaps_per_token']:.2f}"
    out.append(f"| {name} | {budget} | {k[0] if k else '—'} | {_g(r.get('planned_bytes'))} "
               f"| {_g(r.get('peak_device_bytes'))} | {r['ms_per_token']:.2f} | {ratio} "
               f"| {r['stream_p50_ms']:.2f} / {r['stream_p95_ms']:.2f} | {r['prefill_ms']:.1f} "
               f"| {r['tokens_per_s']:.0f} | {red} | {hit} | {swaps} | {r.get('steps_per_call') or '—'} "
               f"| {r.get('commit')} |")
  return "\n".join(out)


def targets_table(rows) -> str:
  """The issue's moonshots on switch-base-64 bf16 batch 1, where the rows to judge them exist."""
  s, d, b = "switch-base-64", "bfloat16", 1
  full, hf = _find(rows, s, d, b, "full"), _find(rows, s, d, b, "hf")
  swap, acc = _find(rows, s, d, b, "swapmoe", "33%"), _find(rows, s, d, b, "accelerate", "33%")
  exact = [r for r in (_find(rows, s, d, b, p, "33%") for p in ("lru", "lfu")) if r]
  best = min(exact, key=lambda r: r["ms_per_token"]) if exact else None
  t = _transfer(rows, s)
  lines = ["| target | measured | met |", "|---|---|---|"]

  def add(target, measured, met):
    lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")

  if full:
    floor = 0.08
    add("full, switch-base-64 bf16, batch 1: ≤ 0.5 ms/token", f"{full['ms_per_token']:.2f} ms/token "
        f"({full['ms_per_token'] / floor:.0f}× the ≈0.08 ms physical floor)", full["ms_per_token"] <= 0.5)
  def faster(target, slow, fast, need, digits):  # a "≥ need× faster" row: the ratio and both figures
    x = slow["ms_per_token"] / fast["ms_per_token"]
    add(target, f"{x:.{digits}f}× ({slow['ms_per_token']:.1f} vs {fast['ms_per_token']:.2f} ms/token)", x >= need)

  if full and hf:
    faster("full ≥ 50× faster than HF PyTorch generate", hf, full, 50, 1)
  if swap and full:
    x = swap["ms_per_token"] / full["ms_per_token"]
    add("swapmoe at 33 %: ≤ 1.05× full", f"{x:.2f}×", x <= 1.05)
    add("swapmoe at 33 %: measured peak ≤ budget", f"{_g(swap['peak_device_bytes'])} of {_g(swap['budget_bytes'])} GiB",
        swap["peak_device_bytes"] is not None and swap["peak_device_bytes"] <= swap["budget_bytes"])
  if swap and acc:
    faster("swapmoe at 33 %: ≥ 100× faster than accelerate offload", acc, swap, 100, 0)
  if best and acc:
    x = acc["ms_per_token"] / best["ms_per_token"]
    ratio = f", {best['ms_per_token'] / full['ms_per_token']:.2f}× full" if full else ""
    add(f"best exact policy at 33 % ({best['policy']}): ≥ 30× faster than accelerate",
        f"{x:.0f}×{ratio}, hit rate {100 * (best.get('hit_rate') or 0):.0f} %", x >= 30)
  if swap:
    f = swap_figures(rows, swap)
    batched = {k: t.get(f"batched_{k}_8_bandwidth") for k in ("device_put", "gather")} if t else {}
    batched = {k: v for k, v in batched.items() if v}
    if "stage_share" in f and batched:  # a commit's experts (default staging) and 8 batched (best path)
      how, best_bw = max(batched.items(), key=lambda kv: kv[1])
      share = best_bw / t["pinned_bandwidth"]
      add("swaps at ≥ 80 % of the pinned bandwidth", f"8 experts batched ({how.replace('_', ' ')}): "
          f"{best_bw / 1e9:.1f} of {f['pinned_gbs']:.1f} GB/s ({100 * share:.0f} %); a commit of "
          f"{swap.get('max_swaps', 2)} ({swap.get('staging', 'transfer')}): {f['stage_gbs']:.1f} GB/s "
          f"({100 * f['stage_share']:.0f} %)", share >= 0.8)
    elif "stage_share" in f:
      add("swaps at ≥ 80 % of the pinned bandwidth", f"{f['stage_gbs']:.1f} of {f['pinned_gbs']:.1f} GB/s "
          f"({100 * f['stage_share']:.0f} %)", f["stage_share"] >= 0.8)
    if "stall_share" in f:
      add("swapmoe swap stalls ≤ 2 % of decode time", f"{100 * f['stall_share']:.1f} % "
          f"({100 * (f['hidden'] or 0):.0f} % of swap time hidden)", f["stall_share"] <= 0.02)
  elif t:
    add("pinned host→device bandwidth", f"{t['pinned_bandwidth'] / 1e9:.1f} GB/s", True)
  return "\n".join(lines)


def swaps_table(rows) -> str:
  out = ["| shape | dtype | batch | policy | budget | swaps / token | staging GB/s | pinned GB/s | share "
         "| swap ms / token | stall ms / token | hidden |", "|---" * 12 + "|"]
  for r in rows:
    if r["policy"] not in ("swapmoe", "lru", "lfu") or not r.get("swaps_per_token") or not _standard(r):
      continue
    f = swap_figures(rows, r)
    pct = lambda v: "—" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    num = lambda v, n=2: "—" if v is None else f"{v:.{n}f}"  # noqa: E731
    out.append(f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['policy']} | {r['budget']} "
               f"| {r['swaps_per_token']:.2f} | {num(f.get('stage_gbs'), 1)} | {num(f.get('pinned_gbs'), 1)} "
               f"| {pct(f.get('stage_share'))} | {num(f.get('swap_ms_per_token'), 3)} "
               f"| {num(f.get('stall_ms_per_token'), 3)} | {pct(f.get('hidden'))} |")
  return "\n".join(out)


def plot(rows, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = list(_groups(rows))
  cols = min(3, len(groups))
  nrows = -(-len(groups) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
  colors = {p: f"C{i}" for i, p in enumerate(POLICY_ORDER)}  # one color per policy in every panel
  handles = {}
  for ax, ((shape, dtype, batch), group) in zip(axes.flat, groups):
    for policy in POLICY_ORDER:
      pts = sorted((100 * budget_share(r), r["ms_per_token"]) for r in group if r["policy"] == policy)
      if not pts:
        continue
      x, y = zip(*pts)
      style = dict(marker="s", linestyle="--") if policy in PEER_NAMES else dict(marker="o")
      (line,) = ax.plot(x, y, color=colors[policy], label=PEER_NAMES.get(policy, policy), **style)
      handles.setdefault(policy, line)
    ax.set_xlim(0, 105)
    ys = [r["ms_per_token"] for r in group]
    if max(ys) > 5 * min(ys):  # peers two orders of magnitude away: a log axis
      ax.set_yscale("log")
    else:  # a linear axis from zero, so 2 % reads as 2 %
      ax.set_ylim(0, 1.15 * max(ys))
    ax.set_xlabel("budget, % of the full model")
    ax.set_ylabel("ms / token")
    ax.set_title(f"{shape} {dtype} batch {batch}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.legend([handles[p] for p in POLICY_ORDER if p in handles],
             [PEER_NAMES.get(p, p) for p in POLICY_ORDER if p in handles], loc="lower right", fontsize=8)
  dev = next((r["device"] for r in rows if r.get("device")), "?")
  fig.suptitle(f"Decode latency against budget ({dev}; random weights)", fontsize=10)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render(rows, command: str, plot_name: str) -> str:
  r0 = rows[0]
  versions = r0.get("versions") or {}
  dev = next((r["device"] for r in rows if r.get("device")), "?")
  commits = ", ".join(sorted({str(r.get("commit")) for r in rows}))
  parts = [BEGIN, "", f"Generated by `benchmarks/report.py` from the rows of commits {commits} "
           f"(device: {dev}; jax {versions.get('jax')}, flax {versions.get('flax')}). Command:", "",
           *[f"    {c}" for c in command], "", "### Targets (switch-base-64, bfloat16, batch 1)", "", targets_table(rows), "",
           f"![ms/token against budget]({plot_name})", ""]
  for key, group in _groups(rows):
    parts += [group_table(rows, key, group), ""]
  parts += ["### Swaps", "", swaps_table(rows), "", END]
  return "\n".join(parts)


def write_results(text: str, path: str) -> None:
  old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  if BEGIN in old and END in old:
    new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
  else:
    new = old.rstrip("\n") + "\n\n" + text + "\n"
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(new)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("jsonl", nargs="?", default=os.path.join(HERE, "results.jsonl"))
  p.add_argument("--commit", nargs="+", help="rows of these commits, later rows replacing earlier ones of the "
                                             "same configuration (default: the newest row's commit)")
  p.add_argument("--command", nargs="+", default=["python benchmarks/bench_decode.py ..."],
                 help="the commands quoted above the tables")
  p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--plot", default=os.path.join(HERE, "results.png"))
  args = p.parse_args(argv)
  rows = load_rows(args.jsonl, args.commit)
  plot(rows, args.plot)
  write_results(render(rows, args.command, os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.results)))),
                args.results)
  print(f"wrote {args.results} and {args.plot} from {len(rows)} rows")
  return 0


if __name__ == "__main__":
  sys.exit(main())
