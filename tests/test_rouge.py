"""Rouge-2 against hand-counted cases and against an independent, list-based count."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapmoe_jax.eval import rouge


def test_tokenizer_lowercases_and_splits_on_non_alphanumerics():
  assert rouge.tokenize("Hello, World!  It's 3pm.") == ["hello", "world", "it", "s", "3pm"]
  assert rouge.tokenize("café-au-lait") == ["caf", "au", "lait"]  # non-ASCII letters separate, as rouge_score
  assert rouge.tokenize(" \t!? ") == []


def test_hand_counted_bigram_overlap():
  # pred bigrams: the-cat cat-sat sat-on on-the the-mat; ref: the-cat cat-is is-on on-the the-mat -> 3 shared
  s = rouge.rouge_n("The cat sat on the mat.", "the cat is on the mat", 2)
  assert (s.precision, s.recall, s.fmeasure) == pytest.approx((3 / 5, 3 / 5, 3 / 5))
  # pred: a-b b-c c-d (3); ref: a-b b-c (2) -> P = 2/3, R = 1, F = 2 * (2/3) / (5/3) = 4/5
  s = rouge.rouge_n("a b c d", "a b c", 2)
  assert (s.precision, s.recall, s.fmeasure) == pytest.approx((2 / 3, 1.0, 0.8))


def test_repeated_bigrams_are_clipped_to_the_reference_count():
  # pred has "the the" three times, the reference once: overlap 1, not 3.
  s = rouge.rouge_n("the the the the", "the the", 2)
  assert (s.precision, s.recall, s.fmeasure) == pytest.approx((1 / 3, 1.0, 0.5))


def test_no_bigrams_scores_zero():
  assert rouge.rouge_n("", "a b", 2) == rouge.Score(0.0, 0.0, 0.0)
  assert rouge.rouge_n("a", "a", 2) == rouge.Score(0.0, 0.0, 0.0)  # one token has no bigram
  assert rouge.rouge_n("x y", "a b", 2) == rouge.Score(0.0, 0.0, 0.0)


def test_corpus_score_is_the_mean_of_example_f1():
  assert rouge.rouge2(["a b c d", "x y", "p q"], ["a b c", "a b", "p q"]) == pytest.approx((0.8 + 0 + 1) / 3)


def test_bad_corpus_input_is_one_clear_error():
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    rouge.rouge2(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no predictions"):
    rouge.rouge2([], [])
  with pytest.raises(ValueError, match="n must be >= 1"):
    rouge.rouge_n("a", "a", 0)


def _f1_by_matching(pred: str, ref: str) -> float:
  """Independent count: match each predicted bigram to an unused equal reference bigram."""
  def bigrams(text):
    words = "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split()
    return [(words[i], words[i + 1]) for i in range(len(words) - 1)]

  p, r = bigrams(pred), bigrams(ref)
  unused = list(r)
  hits = 0
  for g in p:
    if g in unused:
      unused.remove(g)
      hits += 1
  if not hits:
    return 0.0
  precision, recall = hits / len(p), hits / len(r)
  return 2 * precision * recall / (precision + recall)


_TEXT = st.lists(st.sampled_from(["a", "b", "c", "A", "b,", "c.", "d!", "é"]), max_size=12).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(_TEXT, _TEXT)
def test_f1_equals_an_independent_count(pred, ref):
  assert rouge.rouge_n(pred, ref, 2).fmeasure == pytest.approx(_f1_by_matching(pred, ref))
