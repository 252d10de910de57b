"""Prompt residency (`load(prompt_residency=True)`): residents predicted from a prompt's tokens before
its first device call (`residency.PromptPredictor`), learned from the routing the serving loop reads."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.serving.loader import load
from swapmoe_jax.serving.residency import PromptPredictor
from swapmoe_jax.serving.swap import rank_by_score

LIMITS = dict(max_batch_size=1, max_source_len=32, max_new_tokens=16)


def _shares(hot, layers=2, experts=6):
  imp = np.full((layers, experts), 0.1)
  imp[:, hot] = 5.0
  return imp


def test_the_predictor_follows_the_tokens_that_mark_a_task():
  p = PromptPredictor(num_layers=2, num_experts=6)
  assert p.predict([7, 8]) is None  # nothing learned yet
  shared = [1, 2, 3]  # in every prompt: their rows average both tasks
  for _ in range(4):
    p.learn([100] + shared, _shares([0, 1]))
    p.learn([200] + shared, _shares([4, 5]))
  a, b = p.predict([100, 1, 2]), p.predict([3, 200])
  assert a.shape == (2, 6)
  for layer in range(2):
    assert set(np.argsort(-a[layer])[:2].tolist()) == {0, 1}
    assert set(np.argsort(-b[layer])[:2].tolist()) == {4, 5}
  # By hand: a's prediction is the idf-weighted mean of the rows of tokens 100, 1 and 2.
  idf_task, idf_shared = np.log(9 / 4), np.log(9 / 8)
  row_a = _shares([0, 1]) / _shares([0, 1]).sum(axis=1, keepdims=True)
  row_b = _shares([4, 5]) / _shares([4, 5]).sum(axis=1, keepdims=True)
  shared_row = p.shares[1]
  np.testing.assert_allclose(a, (idf_task * row_a + 2 * idf_shared * shared_row) / (idf_task + 2 * idf_shared),
                             rtol=1e-5)
  assert np.all(shared_row > 0) and np.allclose(shared_row.sum(axis=1), 1.0)
  np.testing.assert_allclose(p.shares[200], row_b, rtol=1e-5)  # 4 requests: the running mean of equal rows
  assert p.predict([5000 + 4096 * 3]) is None  # unseen bucket
  # A prediction needs MIN_KNOWN (half) of the prompt's distinct tokens known: 2 of 5 is not enough.
  assert p.MIN_KNOWN == 0.5
  assert p.predict([100, 1, 7001, 7002, 7003]) is None
  np.testing.assert_allclose(p.predict([100, 1, 7001]), p.predict([100, 1]), rtol=1e-6)  # 2 of 3: unknown ignored
  p.learn([9], np.zeros((2, 6)))  # a request that routed nothing teaches nothing
  assert p.requests == 8 and p.predict([9]) is None


def test_a_token_is_known_when_it_was_seen_not_when_its_bucket_was():
  """With a vocabulary larger than the buckets, a prompt of tokens never seen predicts nothing though
  their buckets were seen (the ids below share buckets with the learned ones); a prompt of the learned
  tokens predicts from their rows alone, as a predictor without token ids does. Token ids below BUCKETS
  (the built-in model's 176) are buckets of their own, so there nothing changes."""
  B = PromptPredictor.BUCKETS
  by_id, by_bucket = PromptPredictor(2, 6, vocab_size=4 * B), PromptPredictor(2, 6)
  for p in (by_id, by_bucket):
    p.learn([10, 11, 12], _shares([0, 1]))
    p.learn([20, 21, 22], _shares([4, 5]))
  aliases = [10 + B, 11 + 2 * B, 12 + 3 * B]  # the buckets of 10, 11 and 12
  assert by_id.predict(aliases) is None
  np.testing.assert_allclose(by_bucket.predict(aliases), by_bucket.predict([10, 11, 12]))
  np.testing.assert_allclose(by_id.predict([10, 11, 12]), by_bucket.predict([10, 11, 12]))
  # Half the distinct tokens known is enough (MIN_KNOWN); the unknown half adds no row.
  np.testing.assert_allclose(by_id.predict([10, 11, aliases[0], aliases[1]]), by_id.predict([10, 11]))
  assert by_id.predict([10, aliases[0], aliases[1]]) is None  # 1 of 3
  assert by_id.predict([-1, 5 * B]) is None  # ids outside the vocabulary are never known


def _ask(model, prompt):
  ids = model.tokenizer(prompt, return_tensors="np").input_ids
  return model.generate(ids, max_new_tokens=12)


def test_a_prompt_of_a_known_task_starts_on_that_tasks_experts_without_recompiling():
  compiles = []

  def count(name, *_, **__):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(count)
  model = load(default_checkpoint(), experts=3, policy="swapmoe", prompt_residency=True, planner="uniform", **LIMITS)
  res = model.residency
  sort, reverse = ("sort: 7 3 9 1 4", "sort: 8 2 6 5"), ("reverse: cat dog sun", "reverse: moon star tree")
  for prompt in sort + reverse:
    _ask(model, prompt)
  assert res._prompt.requests == 4
  before = len(compiles)
  ids = model.tokenizer(sort[0], return_tensors="np").input_ids
  predicted = res._prompt.predict(ids.ravel())
  resident = res.controller.state.resident_mask().copy()
  # The predicted top-K_l, residents preferred by the hysteresis as in the controller.
  expected = [sorted(rank_by_score(predicted[l], resident[l], res.controller.hysteresis)[:3].tolist())
              for l in range(len(predicted))]
  assert expected != [np.flatnonzero(r).tolist() for r in resident], "the task changed: something must move"
  pins, swapped = res.prompt_pins, res._swap["experts_swapped"]
  model._slots = res.before_request(model._slots, ids)
  assert res.prompt_pins == pins + 1 and res._swap["experts_swapped"] > swapped
  assert [res.controller.state.resident(l) for l in range(len(expected))] == expected
  # The controller holds them as its targets (its old ones would move the experts straight back).
  assert [np.flatnonzero(t).tolist() for t in res.controller.target_mask] == expected
  scores = res.controller.scores  # the prediction's shape, each layer's total kept
  np.testing.assert_allclose(scores / scores.sum(axis=1, keepdims=True),
                             predicted / predicted.sum(axis=1, keepdims=True), rtol=1e-6)
  assert not res.controller.next_writes()
  model._flush()  # ends the request begun by hand (the prompt's tokens are learned)
  assert res._prompt.requests == 4  # it routed nothing: nothing learned
  for prompt in reverse + sort:
    _ask(model, prompt)
  assert res._prompt.requests == 8
  assert len(compiles) == before, "a prompt-residency swap recompiled"


def test_a_batch_of_several_prompts_neither_pins_nor_learns():
  """Its statistics are summed over its rows: each prompt's tokens would learn the other rows' experts,
  and a prediction for the mix pins towards the mean of past requests (RESULTS.md, session 40)."""
  model = load(default_checkpoint(), experts=3, policy="swapmoe", prompt_residency=True, planner="uniform",
               **dict(LIMITS, max_batch_size=2))
  res = model.residency
  for prompt in ("sort: 7 3 9 1 4", "sort: 8 2 6 5", "reverse: cat dog sun", "reverse: moon star tree"):
    _ask(model, prompt)
  assert res._prompt.requests == 4 and res.prompt_batches_skipped == 0
  prompts = ["sort: 7 3 9 1 4", "reverse: moon star tree"]
  # Each prompt alone has a prediction, ...
  one = model.tokenizer(prompts[0], return_tensors="np").input_ids
  assert res._prompt.predict(one.ravel()) is not None
  batch = model.tokenizer(prompts, return_tensors="np", padding=True)
  pins, swapped = res.prompt_pins, res._swap["experts_swapped"]
  slots = res.before_request(model._slots, batch.input_ids, batch.attention_mask)
  assert slots is model._slots and res._swap["experts_swapped"] == swapped and res.prompt_pins == pins
  model._flush()  # ends the request begun by hand
  assert res._prompt.requests == 4
  # ... and through `generate`: nothing pinned, nothing learned.
  model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=12)
  assert res.prompt_pins == pins and res._prompt.requests == 4 and res.prompt_batches_skipped == 2
  _ask(model, prompts[1])  # one prompt: learned again
  assert res._prompt.requests == 5


def test_the_pinned_set_is_what_the_first_call_runs_on():
  """The tokens of a request equal those of a `pruned` model pinned to the predicted set (the swaps
  landed before the encoder call, in the device's slots)."""
  a = load(default_checkpoint(), experts=3, policy="swapmoe", prompt_residency=True, planner="uniform",
           swap_between_requests=False, max_swaps_per_step=1, **LIMITS)
  for prompt in ("sort: 7 3 9 1 4", "reverse: cat dog sun", "sort: 5 2 8"):
    _ask(a, prompt)
  prompt = "reverse: moon star tree"
  ids = a.tokenizer(prompt, return_tensors="np").input_ids
  predicted = a.residency._prompt.predict(ids.ravel())
  resident = a.residency.controller.state.resident_mask().copy()
  expected = [rank_by_score(predicted[l], resident[l], a.residency.controller.hysteresis)[:3]
              for l in range(len(predicted))]
  b = load(default_checkpoint(), experts=3, policy="pruned", planner="uniform", **LIMITS)
  b.pin_experts(expected)
  # One write per call and no drain: a 12-token request has at most one window read before it ends, so
  # its first token comes from the pinned set alone.
  np.testing.assert_array_equal(_ask(a, prompt)[:, :1], _ask(b, prompt)[:, :1])


def test_prompt_residency_is_refused_where_it_means_nothing():
  with pytest.raises(ValueError, match="prompt_residency applies to policies swapmoe"):
    load(default_checkpoint(), experts=3, policy="lfu", prompt_residency=True, **LIMITS)
  with pytest.raises(ValueError, match="prompt_residency must be True or False"):
    load(default_checkpoint(), experts=3, policy="swapmoe", prompt_residency="yes", **LIMITS)


def test_the_predictor_holds_its_memory_from_the_start_and_learns_as_a_running_mean_per_row():
  """Every bucket's row is allocated when the predictor is made (no growth while prompts arrive), and
  the vectorised update equals, bit for bit, the per-row running mean it replaced."""
  L, E = 3, 5
  p = PromptPredictor(num_layers=L, num_experts=E)
  assert p.shares.shape == (p.BUCKETS, L, E) and p.shares.dtype == np.float32
  rng = np.random.default_rng(0)
  ref: dict[int, np.ndarray] = {}
  seen: dict[int, int] = {}
  for r in range(2 * p.MEMORY + 6):
    # a few buckets in most requests (seen past MEMORY times: the mean turns exponential), others rarely
    tokens = np.concatenate([rng.integers(0, 10, size=8), rng.integers(0, 3 * p.BUCKETS, size=4)])
    imp = rng.random((L, E)) * (rng.random((L, 1)) > 0.2)  # some layers route nothing
    p.learn(tokens, imp)
    total = imp.sum(axis=1, keepdims=True)
    share = np.where(total > 0, imp / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)
    for bucket in np.unique(tokens % p.BUCKETS).tolist():
      seen[bucket] = seen.get(bucket, 0) + 1
      row = ref.setdefault(bucket, np.zeros((L, E), np.float32))
      row += (share - row) / min(seen[bucket], p.MEMORY)
  assert max(seen.values()) > p.MEMORY
  for bucket, row in ref.items():
    np.testing.assert_array_equal(p.shares[bucket], row)
  untouched = np.setdiff1d(np.arange(p.BUCKETS), list(ref))
  assert not p.shares[untouched].any()
