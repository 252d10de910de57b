"""Paired comparisons of two configurations on the same requests, with a confidence interval.

Two policies run on the same request stream score each request 0 or 1 (exact match). Their accuracy
difference is the mean of the per-request differences; its 95 % interval comes from a paired bootstrap
(requests resampled with replacement, both scores of a request kept together), which needs no normal
approximation and respects that both configurations saw the same requests. "Better" means the interval
excludes zero. `gain_ratio` is the fraction of a ceiling's gain over a baseline that a configuration
captures, with an interval from the same kind of resampling. `mcnemar_p` is the exact two-sided
McNemar test on the discordant pairs, for the record.

Requests that repeat a prompt are not independent draws (a long held-out stream repeats the prompts
of its smaller families: 3,000 requests of the built-in model's held-out space hold 2,066 distinct
prompts). With `groups` (a label per request, e.g. its prompt), the bootstrap resamples whole groups —
a cluster bootstrap — so a repeated prompt counts once in the interval's width, not once per repeat.
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


def _resampled_means(columns, groups, resamples: int, seed: int):
  """Bootstrap means of each of `columns` (1-D arrays of one length), resampling whole groups with
  replacement (each request its own group when `groups` is None): a list of [resamples] arrays, one
  per column. A resample's mean is its groups' sum over their requests (the cluster bootstrap's ratio
  estimator; with one request per group, the plain bootstrap, drawn identically)."""
  n = columns[0].size
  if groups is None:
    inverse, sizes = np.arange(n), np.ones(n)
  else:
    groups = np.asarray(groups)
    if groups.shape != (n,):
      raise ValueError(f"groups must give one label per request ({n}), got shape {groups.shape}")
    _, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse).astype(np.float64)
  sums = [np.bincount(inverse, weights=c, minlength=sizes.size) for c in columns]
  rng = np.random.default_rng(seed)
  out = [[] for _ in columns]
  for i in range(0, resamples, 1000):  # in chunks, to bound memory for long streams
    idx = rng.integers(0, sizes.size, (min(1000, resamples - i), sizes.size))
    count = sizes[idx].sum(axis=1)
    for o, s in zip(out, sums):
      o.append(s[idx].sum(axis=1) / count)
  return [np.concatenate(o) for o in out]


def paired_difference(a, b, *, groups=None, resamples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
  """a, b: per-request scores (0/1 or any float) of two configurations on the same requests, in order.
  groups: optional label per request (e.g. its prompt); the interval then resamples whole groups."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"a and b must be non-empty 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
  d = a - b
  (means,) = _resampled_means([d], groups, resamples, seed)
  tail = (1 - level) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return PairedDifference(float(d.mean()), float(low), float(high), int(d.size),
                          int(np.sum((a > b))), int(np.sum(b > a)))


@dataclasses.dataclass(frozen=True)
class GainRatio:
  """(mean(a) - mean(base)) / (mean(ceiling) - mean(base)) over n paired requests, with its bootstrap
  interval [low, high]. ratio is None where the ceiling gains nothing over the base (nothing to
  capture); low / high are None where the interval is unbounded on that side."""

  ratio: float | None
  low: float | None
  high: float | None
  n: int


def gain_ratio(a, ceiling, base, *, groups=None, resamples: int = 10_000, seed: int = 0,
               level: float = 0.95) -> GainRatio:
  """The fraction of `ceiling`'s gain over `base` that `a` captures: per-request scores of three
  configurations on the same requests, in order. The interval resamples requests (all three scores of a
  request together; whole groups with `groups`, as `paired_difference`); a resample in which the
  ceiling gains nothing counts as an unbounded ratio with the sign of a's gain, which widens the
  interval rather than dropping the resample."""
  a, c, b = (np.asarray(x, np.float64) for x in (a, ceiling, base))
  if not a.shape == c.shape == b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"a, ceiling and base must be non-empty 1-D arrays of one length, got shapes "
                     f"{a.shape}, {c.shape} and {b.shape}")
  num, den = a - b, c - b
  if den.mean() <= 0:
    return GainRatio(None, None, None, int(a.size))
  n, d = _resampled_means([num, den], groups, resamples, seed)
  ratios = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.where(n >= 0, np.inf, -np.inf))
  tail = (1 - level) / 2
  # "nearest": interpolating between two unbounded resamples would give nan
  low, high = np.quantile(ratios, [tail, 1 - tail], method="nearest")
  bounded = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
  return GainRatio(float(num.mean() / den.mean()), bounded(low), bounded(high), int(a.size))


def mcnemar_p(a_only: int, b_only: int) -> float:
  """Exact two-sided McNemar p-value: the discordant pairs under Binomial(a_only + b_only, 1/2)."""
  n, k = a_only + b_only, min(a_only, b_only)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  return min(1.0, 2 * tail)
