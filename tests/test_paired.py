"""Paired comparisons (eval/paired.py): the bootstrap interval and the exact McNemar test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from swapmoe_jax.eval.paired import gain_ratio, mcnemar_p, paired_difference


def test_certain_differences_have_degenerate_intervals():
  d = paired_difference(np.ones(50), np.zeros(50))
  assert (d.diff, d.low, d.high, d.a_only, d.b_only, d.n) == (1.0, 1.0, 1.0, 50, 0, 50) and d.excludes_zero
  same = paired_difference(np.ones(50), np.ones(50))
  assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_interval_matches_the_normal_approximation_on_a_long_stream():
  """For n = 4000 paired 0/1 scores the bootstrap interval is close to mean ± 1.96 sd / sqrt(n)."""
  rng = np.random.default_rng(1)
  a = (rng.random(4000) < 0.80).astype(int)
  b = np.where(rng.random(4000) < 0.9, a, 1 - a)  # b disagrees with a on ~10 % of requests
  d = paired_difference(a, b, resamples=4000)
  diffs = a - b
  half = 1.96 * diffs.std(ddof=1) / np.sqrt(diffs.size)
  assert d.diff == pytest.approx(diffs.mean())
  assert d.low == pytest.approx(diffs.mean() - half, abs=0.15 * half)
  assert d.high == pytest.approx(diffs.mean() + half, abs=0.15 * half)
  assert d.a_only == int(np.sum(diffs > 0)) and d.b_only == int(np.sum(diffs < 0))


def test_pairing_matters():
  """The same two accuracies, paired on agreeing requests, give a narrower interval than unpaired
  (shuffled) scores: the interval is of the paired difference."""
  rng = np.random.default_rng(2)
  a = (rng.random(600) < 0.7).astype(int)
  b = a.copy()
  flip = rng.choice(600, 30, replace=False)
  b[flip] = 0
  paired = paired_difference(a, b)
  unpaired = paired_difference(a, rng.permutation(b))
  assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
  assert paired.excludes_zero


@pytest.mark.parametrize("a_only, b_only", [(0, 6), (1, 7), (3, 3), (2, 9), (0, 0)])
def test_mcnemar_equals_enumerating_every_sign_assignment(a_only, b_only):
  """Under the null each discordant pair goes either way with probability 1/2: count the assignments
  at least as unbalanced as the one observed."""
  n = a_only + b_only
  observed = abs(a_only - b_only)
  extreme = sum(1 for signs in itertools.product((0, 1), repeat=n) if abs(2 * sum(signs) - n) >= observed)
  assert mcnemar_p(a_only, b_only) == pytest.approx(min(1.0, extreme / 2**n))


def test_groups_of_one_request_are_the_plain_bootstrap():
  """Distinct labels for every request draw the same resamples as no labels: the same interval."""
  rng = np.random.default_rng(3)
  a, b = (rng.random(300) < 0.8).astype(int), (rng.random(300) < 0.7).astype(int)
  plain, grouped = paired_difference(a, b), paired_difference(a, b, groups=[f"p{i}" for i in range(300)])
  assert (plain.low, plain.high) == (grouped.low, grouped.high)
  base = (rng.random(300) < 0.5).astype(int)
  assert gain_ratio(a, np.ones(300), base) == gain_ratio(a, np.ones(300), base, groups=np.arange(300))


def test_repeated_prompts_widen_the_interval_to_their_distinct_count():
  """100 distinct prompts each asked 10 times, each answered the same way every time: the requests
  carry the information of 100 draws, not 1000. Resampling whole prompts gives the interval of the
  100 distinct draws (as wide as the plain bootstrap over them); resampling requests, one ~sqrt(10)
  times narrower."""
  rng = np.random.default_rng(4)
  a1, b1 = (rng.random(100) < 0.8).astype(int), (rng.random(100) < 0.6).astype(int)
  a, b, prompts = np.repeat(a1, 10), np.repeat(b1, 10), np.repeat(np.arange(100), 10)
  per_request = paired_difference(a, b)
  clustered = paired_difference(a, b, groups=prompts)
  distinct = paired_difference(a1, b1)
  assert clustered.diff == per_request.diff == pytest.approx(distinct.diff)
  width = lambda d: d.high - d.low  # noqa: E731
  assert width(clustered) == pytest.approx(width(distinct), rel=0.15)
  assert width(clustered) > 2.5 * width(per_request)
  with pytest.raises(ValueError, match="one label per request"):
    paired_difference(a, b, groups=prompts[:-1])


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="one length"):
    paired_difference([1, 0], [1])
  with pytest.raises(ValueError, match="non-empty"):
    paired_difference([], [])
