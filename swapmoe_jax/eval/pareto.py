"""Exact match against the share of tokens whose expert is read from host memory inside the step: the
cost side of exact (`lfu`), selective (one point per threshold) and masked (`swapmoe`, `pruned`,
`oracle`: none read) routing, at each number of resident experts.

  python -m swapmoe_jax.eval.pareto evaluation/evaluation.json more.json --stream runs --out evaluation/pareto.png

The host reads are what a GPU pays for (a miss moves the expert's bytes over PCIe inside the step), so
they are the device-independent cost axis; ms/token from the same rows is CPU time and says nothing
about a GPU — unless the report was made on the GPU: `--cost ms` then plots ms per token over
`full`'s from the same report. Rows come from `evaluation.json` files of runs on the same stream and seed (the same
requests), merged; a table of the points is printed.
"""

from __future__ import annotations

import argparse
import json
import sys

from swapmoe_jax.eval.evaluate import row_label

MASKED = ("swapmoe", "pruned", "oracle")


def points(rows: list[dict], stream: str, cost: str = "host") -> dict[int, list[tuple[str, float, float]]]:
  """Per K: (label, cost, exact match), sorted by cost then label. cost "host": the share of tokens
  read from host memory; "ms": ms per generated token over `full`'s in the same rows (whole requests,
  as `evaluate` times them: meaningful where the report was made on the accelerator in question)."""
  out: dict[int, list] = {}
  seen = set()
  full_ms = next((r.get("ms_per_token") for r in rows if r["stream"] == stream and r["policy"] == "full"), None)
  if cost == "ms" and not full_ms:
    raise ValueError("cost 'ms' needs a full row with ms_per_token in the reports")
  for r in rows:
    if r["stream"] != stream or r["policy"] == "full":
      continue
    label = row_label(r)
    if (r["slots"], label) in seen:
      continue
    seen.add((r["slots"], label))
    if cost == "ms":
      share = r["ms_per_token"] / full_ms
    else:
      share = 0.0 if r["policy"] in MASKED else r.get("bank_rate")
    if share is None:
      continue
    out.setdefault(r["slots"], []).append((label, float(share), float(r["exact_match"])))
  return {k: sorted(v, key=lambda p: (p[1], p[0])) for k, v in sorted(out.items())}


def plot(pts: dict, full_em: float | None, path: str, title: str, cost: str = "host") -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, axes = plt.subplots(1, len(pts), figsize=(5 * len(pts), 4), squeeze=False)
  scale = 1 if cost == "ms" else 100
  for ax, (k, ps) in zip(axes[0], pts.items()):
    sel = [(x, y) for label, x, y in ps if label.startswith("selective")]
    if sel:
      ax.plot([scale * x for x, _ in sel], [100 * y for _, y in sel], "o-", label="selective (thresholds)")
    for label, x, y in ps:
      if not label.startswith("selective"):
        ax.plot(scale * x, 100 * y, "s", label=label)
      ax.annotate(label.replace("selective ", ""), (scale * x, 100 * y), fontsize=7, xytext=(3, -9),
                  textcoords="offset points")
    if full_em is not None:
      ax.axhline(100 * full_em, color="gray", ls="--", lw=1, label="full")
    ax.set_title(f"{k} of the experts resident")
    ax.set_xlabel("ms per generated token, x full's (whole requests)" if cost == "ms"
                  else "tokens whose expert is read from host memory (%)")
    ax.set_ylabel("exact match (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m swapmoe_jax.eval.pareto", description=__doc__.split("\n\n")[0])
  p.add_argument("reports", nargs="+", help="evaluation.json files (same stream and seed)")
  p.add_argument("--stream", default="runs")
  p.add_argument("--out", default="pareto.png")
  p.add_argument("--cost", choices=("host", "ms"), default="host",
                 help="x axis: tokens read from host memory (host), or ms per token over full's (ms: for "
                      "reports made on the accelerator in question, e.g. a GPU)")
  a = p.parse_args(argv)
  rows = []
  for path in a.reports:
    with open(path) as f:
      rows += json.load(f)["rows"]
  full = [r["exact_match"] for r in rows if r["policy"] == "full" and r["stream"] == a.stream]
  if len(set(full)) > 1:
    print(f"error: the reports' full rows differ ({sorted(set(full))}): not the same requests", file=sys.stderr)
    return 2
  try:
    pts = points(rows, a.stream, a.cost)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not pts:
    print(f"error: no rows of stream {a.stream!r}", file=sys.stderr)
    return 2
  what = "ms/token over full's" if a.cost == "ms" else "read from host"
  print(f"| experts resident | policy | {what} | exact match |\n|---|---|---|---|")
  for k, ps in pts.items():
    for label, x, y in ps:
      print(f"| {k} | {label} | {f'{x:.2f}x' if a.cost == 'ms' else f'{100 * x:.1f}%'} | {100 * y:.1f}% |")
  n = next(r["requests"] for r in rows if r["stream"] == a.stream)
  made = plot(pts, full[0] if full else None, a.out, f"built-in model, {a.stream} stream, {n} requests", a.cost)
  print(f"wrote {made}" if made else "matplotlib missing: no plot", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
