"""ROUGE-N (Lin, 2004) as the `rouge_score` package computes it with its default tokenizer, no stemming.

Tokens: the text lowercased, every run of characters outside [a-z0-9] replaced by one space, split on
whitespace (so "Don't!" -> ["don", "t"], and accented letters separate words, as in `rouge_score`).
N-gram overlap is clipped: an n-gram counts at most as often as it occurs in the reference.
precision = overlap / predicted n-grams, recall = overlap / reference n-grams (each divisor at least 1),
F1 = 2PR / (P + R), 0 when both are 0. A corpus score is the mean of the per-example F1 (what
`rouge_score`'s aggregator estimates, without the bootstrap).

The paper (SwapMoE, arXiv 2308.15030, Table 2) reports Rouge-2 on SAMSum; `rouge2` is that metric.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class Score:
  """One prediction's ROUGE-N against one reference, each in [0, 1]."""

  precision: float
  recall: float
  fmeasure: float


def tokenize(text: str) -> list[str]:
  """`rouge_score`'s default tokens: lowercase alphanumeric runs."""
  return _NON_ALNUM.sub(" ", text.lower()).split()


def ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  """Counts of the n-grams (tuples of n consecutive tokens)."""
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: str, reference: str, n: int = 2) -> Score:
  """ROUGE-N of one prediction against one reference (clipped n-gram overlap)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  pred, ref = ngrams(tokenize(prediction), n), ngrams(tokenize(reference), n)
  overlap = sum((pred & ref).values())  # Counter & Counter: the minimum count of each n-gram
  precision = overlap / max(sum(pred.values()), 1)
  recall = overlap / max(sum(ref.values()), 1)
  f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return Score(precision, recall, f)


def rouge2(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean Rouge-2 F1 over pairs of prediction and reference, in [0, 1]."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not predictions:
    raise ValueError("no predictions to score")
  return sum(rouge_n(p, r, 2).fmeasure for p, r in zip(predictions, references)) / len(predictions)
