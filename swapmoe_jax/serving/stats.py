"""Routing statistics from the device step, and run telemetry built from them.

The jitted step returns, per call, numpy arrays after `device_get` (the seam between the two worlds):
  importance float32[L,E]  paper Eq. 1 over the tokens the *unmasked* router sends to each expert:
                           sum of ||x|| * G(x)_i * ||E_i||;
  wanted     int32[L,E]    tokens the unmasked router sends to each expert;
  served     int32[L,E]    tokens each expert computed after masking (and capacity drops);
  redirected int32[L]      tokens served by another expert than the one they wanted;
  from_bank  int32[L]      tokens whose non-resident expert was computed from the host bank inside the
                           step (exact routing's misses, selective routing's misses at or above its
                           threshold; selective's other misses are the redirected ones). Under policy
                           "fallback": the tokens computed from the experts' int8 copies on the device
                           (every miss; nothing is read from the host bank there).
  missed_experts int32[L]  distinct non-resident experts that served tokens, per layer call, summed over
                           calls: under exact and selective routing the expert weights the steps needed
                           from host memory (times an expert's bytes: `Telemetry`'s bytes_from_host);
                           under "fallback", the int8 copies used.
A layer that saw no tokens in a call (the encoder during decode steps) has all-zero rows.

Axis letters: L MoE layers, E experts, K slots.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from swapmoe_jax.serving.budget import format_bytes


@dataclasses.dataclass(frozen=True)
class RoutingStats:
  """One call's (or several merged calls') routing statistics.

  Stored as float64 / int64 on the host, so that merging many calls neither rounds nor overflows.
  """

  importance: np.ndarray  # float64[L,E]
  wanted: np.ndarray  # int64[L,E]
  served: np.ndarray  # int64[L,E]
  redirected: np.ndarray  # int64[L]
  from_bank: np.ndarray | None = None  # int64[L]; None: zeros
  missed_experts: np.ndarray | None = None  # int64[L]; None: zeros

  def __post_init__(self):
    # Copies: the fields are made read-only, and the caller's arrays must stay theirs.
    imp = np.array(self.importance, dtype=np.float64)
    if imp.ndim != 2:
      raise ValueError(f"importance must be [L,E], got shape {imp.shape}")
    wanted = np.array(self.wanted, dtype=np.int64)
    served = np.array(self.served, dtype=np.int64)
    redirected = np.array(self.redirected, dtype=np.int64)
    from_bank = np.zeros_like(redirected) if self.from_bank is None else np.array(self.from_bank, dtype=np.int64)
    missed = (np.zeros_like(redirected) if self.missed_experts is None
              else np.array(self.missed_experts, dtype=np.int64))
    if wanted.shape != imp.shape or served.shape != imp.shape:
      raise ValueError(f"wanted {wanted.shape} and served {served.shape} must match importance {imp.shape}")
    if redirected.shape != imp.shape[:1]:
      raise ValueError(f"redirected must be [L={imp.shape[0]}], got shape {redirected.shape}")
    if from_bank.shape != redirected.shape:
      raise ValueError(f"from_bank must be [L={imp.shape[0]}], got shape {from_bank.shape}")
    if missed.shape != redirected.shape:
      raise ValueError(f"missed_experts must be [L={imp.shape[0]}], got shape {missed.shape}")
    for name, arr in (("importance", imp), ("wanted", wanted), ("served", served), ("redirected", redirected),
                      ("from_bank", from_bank), ("missed_experts", missed)):
      arr.flags.writeable = False
      object.__setattr__(self, name, arr)

  @classmethod
  def zeros(cls, num_layers: int, num_experts: int) -> "RoutingStats":
    z = np.zeros((num_layers, num_experts))
    return cls(z, z, z, np.zeros(num_layers))

  @property
  def num_layers(self) -> int:
    return self.importance.shape[0]

  @property
  def num_experts(self) -> int:
    return self.importance.shape[1]

  @property
  def tokens_routed(self) -> int:
    """Routing decisions: tokens summed over the MoE layers that saw them."""
    return int(self.wanted.sum())

  def active_layers(self) -> np.ndarray:
    """bool[L]: layers that saw tokens in these calls."""
    return (self.wanted.sum(axis=1) > 0) | (self.importance.sum(axis=1) > 0)

  def used(self) -> np.ndarray:
    """bool[L,E]: experts the unmasked router wanted for at least one token."""
    return self.wanted > 0

  def merge(self, other: "RoutingStats") -> "RoutingStats":
    """Element-wise sum of two calls' statistics."""
    if other.importance.shape != self.importance.shape:
      raise ValueError(f"cannot merge stats of shape {other.importance.shape} into {self.importance.shape}")
    return RoutingStats(self.importance + other.importance, self.wanted + other.wanted,
                        self.served + other.served, self.redirected + other.redirected,
                        self.from_bank + other.from_bank, self.missed_experts + other.missed_experts)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """What happened in one device call.

  hits / misses count (layer, expert) pairs the unmasked router wanted in this call, by whether the
  expert was resident in a committed slot: the events that cost a copy under exact routing.
  redirected / from_bank count tokens (token-choice pairs for top-k), summed over the layers: those
  served by another expert, and those whose non-resident expert was read from the host bank.
  """

  step: int
  redirected: int = 0
  from_bank: int = 0
  missed_experts: int = 0
  wanted: int = 0
  served: int = 0
  hits: int = 0
  misses: int = 0
  experts_swapped: int = 0
  bytes_swapped: int = 0
  transfer_s: float = 0.0
  wait_s: float = 0.0

  @classmethod
  def from_stats(cls, step: int, stats: RoutingStats, **kwargs) -> "StepRecord":
    return cls(step=step, redirected=int(stats.redirected.sum()), from_bank=int(stats.from_bank.sum()),
               missed_experts=int(stats.missed_experts.sum()),
               wanted=stats.tokens_routed, served=int(stats.served.sum()), **kwargs)


_TOTALS = ("redirected", "from_bank", "missed_experts", "wanted", "served", "hits", "misses", "experts_swapped", "bytes_swapped",
           "transfer_s", "wait_s")


class Telemetry:
  """Run totals and rates over StepRecords, plus the current resident set per layer.

  Args:
    policy: the swap policy's name, for the report.
    keep_records: keep the most recent StepRecords (for `to_json(records=True)`); totals are kept
      either way.
    max_records: how many: a server runs for millions of steps, and every record kept for ever grew
      the process by ~1.5 MiB per 10,000 decode steps (benchmarks/soak.py found it).
    host_expert_bytes: an expert's bytes where misses are read from host memory (exact and selective
      routing), else 0: `summary()["bytes_from_host"]` = missed experts x this.
  """

  def __init__(self, policy: str = "", keep_records: bool = True, max_records: int = 1024,
               host_expert_bytes: int = 0):
    self.policy = policy
    self.host_expert_bytes = int(host_expert_bytes)  # bytes of an expert read from host on a miss (0: none)
    self.keep_records = keep_records
    self.records: collections.deque[StepRecord] = collections.deque(maxlen=max_records)
    self.steps = 0
    self.totals: dict[str, float] = {name: 0 for name in _TOTALS}
    self.resident: list[list[int]] = []

  def add(self, record: StepRecord) -> None:
    self.steps += 1
    for name in _TOTALS:
      self.totals[name] += getattr(record, name)
    if self.keep_records:
      self.records.append(record)

  def set_resident(self, slot_experts: Sequence[np.ndarray]) -> None:
    """Records each layer's resident experts (slot contents, -1 for empty slots, which are dropped)."""
    self.resident = [sorted(int(e) for e in np.asarray(s) if e >= 0) for s in slot_experts]

  @property
  def redirect_rate(self) -> float:
    """Redirected tokens / routing decisions (tokens x MoE layers)."""
    wanted = self.totals["wanted"]
    return self.totals["redirected"] / wanted if wanted else 0.0

  @property
  def hit_rate(self) -> float:
    """Resident (layer, expert) pairs among those wanted, per call."""
    looked_up = self.totals["hits"] + self.totals["misses"]
    return self.totals["hits"] / looked_up if looked_up else 0.0

  def summary(self) -> dict:
    """JSON-safe totals and rates."""
    t = self.totals
    return {
        "policy": self.policy,
        "steps": self.steps,
        "tokens_routed": int(t["wanted"]),
        "served": int(t["served"]),
        "redirected": int(t["redirected"]),
        "redirect_rate": self.redirect_rate,
        "from_bank": int(t["from_bank"]),
        "missed_experts": int(t["missed_experts"]),
        "bytes_from_host": int(t["missed_experts"]) * self.host_expert_bytes,
        "hits": int(t["hits"]),
        "misses": int(t["misses"]),
        "hit_rate": self.hit_rate,
        "experts_swapped": int(t["experts_swapped"]),
        "bytes_swapped": int(t["bytes_swapped"]),
        "transfer_s": float(t["transfer_s"]),
        "transfer_gb_per_s": t["bytes_swapped"] / t["transfer_s"] / 1e9 if t["transfer_s"] > 0 else None,
        "wait_s": float(t["wait_s"]),
        "resident": [list(r) for r in self.resident],
    }

  def to_json(self, records: bool = False) -> str:
    out = self.summary()
    if records:
      out["records"] = [dataclasses.asdict(r) for r in self.records]
    return json.dumps(out)

  def __str__(self) -> str:
    s = self.summary()
    rate = f" ({s['transfer_gb_per_s']:.1f} GB/s)" if s["transfer_gb_per_s"] else ""
    rows = [
        ("policy", f"{s['policy'] or '-'}   steps {s['steps']}"),
        ("routing", f"tokens {s['tokens_routed']:,}   redirected {s['redirected']:,} "
                    f"({100 * s['redirect_rate']:.2f}%)   from bank {s['from_bank']:,}   served {s['served']:,}"),
        ("experts", f"hits {s['hits']:,}   misses {s['misses']:,}   hit rate {100 * s['hit_rate']:.1f}%"
                    + (f"   read from host {s['missed_experts']:,} ({format_bytes(s['bytes_from_host'])})"
                       if self.host_expert_bytes else "")),
        ("swaps", f"{s['experts_swapped']:,} experts   {format_bytes(s['bytes_swapped'])}   transfer "
                  f"{1e3 * s['transfer_s']:.1f} ms{rate}   compute wait {1e3 * s['wait_s']:.1f} ms"),
    ]
    for layer, experts in enumerate(s["resident"]):
      rows.append((f"layer {layer}", f"{len(experts)} resident {experts}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
