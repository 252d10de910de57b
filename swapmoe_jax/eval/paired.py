"""Paired comparisons of two configurations on the same requests, with a confidence interval.

Two policies run on the same request stream score each request 0 or 1 (exact match). Their accuracy
difference is the mean of the per-request differences; its 95 % interval comes from a paired bootstrap
(requests resampled with replacement, both scores of a request kept together), which needs no normal
approximation and respects that both configurations saw the same requests. "Better" means the interval
excludes zero. `mcnemar_p` is the exact two-sided McNemar test on the discordant pairs, for the record.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """mean(a) - mean(b) over n paired requests, with its 95 % bootstrap interval [low, high]."""

  diff: float
  low: float
  high: float
  n: int
  a_only: int  # requests a got right and b wrong
  b_only: int  # requests b got right and a wrong

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  def points(self) -> str:
    """'+3.2 [+1.0, +5.4]' in percentage points."""
    return f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_difference(a, b, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> PairedDifference:
  """a, b: per-request scores (0/1 or any float) of two configurations on the same requests, in order."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"a and b must be non-empty 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
  d = a - b
  rng = np.random.default_rng(seed)
  # Resampled means of the differences, in chunks to bound memory for long streams.
  means = np.concatenate([d[rng.integers(0, d.size, (min(1000, resamples - i), d.size))].mean(axis=1)
                          for i in range(0, resamples, 1000)])
  tail = (1 - level) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return PairedDifference(float(d.mean()), float(low), float(high), int(d.size),
                          int(np.sum((a > b))), int(np.sum(b > a)))


def mcnemar_p(a_only: int, b_only: int) -> float:
  """Exact two-sided McNemar p-value: the discordant pairs under Binomial(a_only + b_only, 1/2)."""
  n, k = a_only + b_only, min(a_only, b_only)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  return min(1.0, 2 * tail)
