"""The oracle bound of masked routing: per task family, the best static resident set, chosen in hindsight.

For a budget of K_l experts per MoE layer, `full` (every expert resident) is run over the request
stream first, and for each request the tokens its unmasked router sent to each expert of each layer
(`RoutingStats.wanted`, int[L,E]) are recorded. Summed over a family's requests in that stream (the
same requests the oracle is then scored on: hindsight), the family's resident set is, per layer, the
K_l experts that `full` sent the most tokens to (lower expert id on ties): the static set that leaves
the fewest of full's routing decisions to redirect. The oracle then serves the stream under masked
routing (`pruned`'s static controller) and pins the family's set (`ServedModel.pin_experts`) before
the first request of each run of one family. No controller that sees requests only as they come can
know a family's routing in advance, so its exact match is the ceiling the swapmoe controller is
measured against ("captured": swapmoe's gain over pruned / the oracle's gain over pruned).

Axis letters: L MoE layers, E experts, K slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class WantedRecorder:
  """A `run_stream` after_batch hook: the wanted counts int64[L,E] of each request, read as differences
  of the model's merged routing statistics (`Residency.totals`) around its call. Batches of one request
  only (a batch's counts cannot be split among its rows)."""

  def __init__(self, model):
    if model.residency is None:
      raise ValueError("the model has no residency: no routing statistics to record")
    self.model = model
    self._last = model.residency.totals.wanted.copy()
    self.per_request: list[np.ndarray] = []

  def __call__(self, start: int, stop: int) -> None:
    if stop - start != 1:
      raise ValueError(f"per-request counts need batches of one request, got requests [{start}, {stop})")
    now = self.model.residency.totals.wanted.copy()
    self.per_request.append(now - self._last)
    self._last = now


def family_resident(counts: Sequence[np.ndarray], families: Sequence[str],
                    slots_per_layer: Sequence[int]) -> dict[str, list[np.ndarray]]:
  """Per family, per layer, the K_l experts most wanted over the family's requests.

  Args:
    counts: per request, int[L,E] tokens the unmasked router sent to each expert.
    families: per request, its family's name.
    slots_per_layer: K_l per layer.
  Returns:
    {family: per layer int32[K_l] expert ids, by falling count (ties: lower expert id first)}.
  """
  if len(counts) != len(families):
    raise ValueError(f"{len(counts)} count arrays for {len(families)} requests")
  sums: dict[str, np.ndarray] = {}
  for c, fam in zip(counts, families):
    c = np.asarray(c, np.int64)
    if c.ndim != 2 or c.shape[0] != len(slots_per_layer):
      raise ValueError(f"counts must be [L={len(slots_per_layer)}, E], got shape {c.shape}")
    sums[fam] = sums[fam] + c if fam in sums else c.copy()
  return {fam: [np.argsort(-row, kind="stable")[:k].astype(np.int32) for row, k in zip(total, slots_per_layer)]
          for fam, total in sums.items()}


def run_starts(families: Sequence[str]) -> list[int]:
  """Indices of the requests that begin a run of one family (the first request, and every change)."""
  return [i for i, fam in enumerate(families) if i == 0 or fam != families[i - 1]]


class FamilyPinner:
  """A `run_stream` before_batch hook (and `teacher_forced` before hook): pins the family's set before
  the first request of each run. Batches of one request only, as `WantedRecorder`."""

  def __init__(self, model, families: Sequence[str], sets: dict[str, list[np.ndarray]]):
    missing = set(families) - set(sets)
    if missing:
      raise ValueError(f"no resident set for families {sorted(missing)}")
    self.model, self.families, self.sets = model, list(families), sets
    self._starts = set(run_starts(self.families))
    self.pins = 0

  def __call__(self, start: int, stop: int) -> None:
    if stop - start != 1:
      raise ValueError(f"pinning per family needs batches of one request, got requests [{start}, {stop})")
    if start in self._starts:
      self.model.pin_experts(self.sets[self.families[start]])
      self.pins += 1


def bound(rows: list[dict]) -> list[dict]:
  """One entry per (stream, K, gate) with an oracle row: exact match of full / pruned / swapmoe /
  oracle, their paired differences (dicts of `PairedDifference`'s fields, from the rows' comparisons),
  the captured fraction and the redirect rates. Missing rows give None."""
  def find(stream, policy, k=None, gate=None):
    return next((r for r in rows if (r["stream"], r["policy"]) == (stream, policy)
                 and (k is None or r["slots"] == k) and (gate is None or r["gate"] == gate)), None)

  out = []
  for o in (r for r in rows if r["policy"] == "oracle"):
    full = find(o["stream"], "full")
    pruned, swap = (find(o["stream"], p, o["slots"], o["gate"]) for p in ("pruned", "swapmoe"))
    em = lambda r: None if r is None else r["exact_match"]  # noqa: E731
    rate = lambda r: None if r is None else r["redirect_rate"]  # noqa: E731
    out.append(dict(
        stream=o["stream"], slots=o["slots"], experts=o["experts"], expert_pct=o["expert_pct"], gate=o["gate"],
        requests=o["requests"], full=em(full), pruned=em(pruned), swapmoe=em(swap), oracle=em(o),
        oracle_vs_pruned=o.get("vs_pruned"), swapmoe_vs_pruned=None if swap is None else swap.get("vs_pruned"),
        swapmoe_vs_oracle=None if swap is None else swap.get("vs_oracle"),
        captured=None if swap is None else swap.get("captured"),
        redirect=dict(pruned=rate(pruned), swapmoe=rate(swap), oracle=rate(o)),
        pins=o.get("pins"), experts_swapped=dict(swapmoe=None if swap is None else swap["experts_swapped"],
                                                 oracle=o["experts_swapped"])))
  return out


def markdown(entries: list[dict]) -> str:
  """The oracle-bound table (see `bound`), exact match and differences in percentage points."""
  pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
  pp = lambda d: "—" if not d else f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"  # noqa: E731
  head = ("| stream | experts resident | gate | full | pruned | swapmoe | oracle | oracle − pruned [95% CI] | "
          "swapmoe − pruned [95% CI] | swapmoe − oracle [95% CI] | captured [95% CI] | redirect pruned / "
          "swapmoe / oracle | swaps swapmoe / oracle |")
  lines = [head, "|" + "---|" * 13]
  for e in entries:
    red = " / ".join(pct(e["redirect"][p]) for p in ("pruned", "swapmoe", "oracle"))
    swaps = " / ".join("—" if v is None else str(v) for v in (e["experts_swapped"]["swapmoe"],
                                                               e["experts_swapped"]["oracle"]))
    lines.append(
        f"| {e['stream']} | {e['slots']}/{e['experts']} ({e['expert_pct']}%) | {e['gate']} | {pct(e['full'])} | "
        f"{pct(e['pruned'])} | {pct(e['swapmoe'])} | {pct(e['oracle'])} | {pp(e['oracle_vs_pruned'])} | "
        f"{pp(e['swapmoe_vs_pruned'])} | {pp(e['swapmoe_vs_oracle'])} | {captured_text(e['captured'])} | "
        f"{red} | {swaps} |")
  return "\n".join(lines)


def captured_text(c: dict | None) -> str:
  """'0.62 [0.31, 0.95]', or '—' where the oracle gained nothing over pruned (nothing to capture)."""
  if not c or c["ratio"] is None:
    return "—"
  low = "−∞" if c["low"] is None else f"{c['low']:.2f}"
  high = "∞" if c["high"] is None else f"{c['high']:.2f}"
  return f"{c['ratio']:.2f} [{low}, {high}]"
