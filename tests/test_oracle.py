"""`ServedModel.pin_experts` (resident experts set from Python, without recompiling) and the evaluation's
`oracle` policy (per-family top-K of full's routing in hindsight, pinned at every change of family)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swapmoe_jax.builtin import tasks
from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.eval import evaluate, oracle
from swapmoe_jax.eval.paired import gain_ratio
from swapmoe_jax.eval.requests import make_requests, run_stream
from swapmoe_jax.serving import decode
from swapmoe_jax.serving.executor import slot_leaf_positions
from swapmoe_jax.serving.loader import load

LIMITS = dict(max_batch_size=1, max_source_len=evaluate.SRC_LEN, max_new_tokens=evaluate.NEW_TOKENS)
_BACKEND_COMPILES = []


def _listener(name, _duration, **_):
  if name == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_listener)


# --- the oracle's sets from given counts ------------------------------------------------------------
def test_family_resident_takes_each_familys_top_k_per_layer():
  # L=2 layers, E=5 experts, K = (2, 3); requests of families a, b, a.
  counts = [np.array([[5, 0, 1, 0, 0], [0, 0, 0, 9, 1]]),
            np.array([[0, 0, 0, 4, 4], [1, 1, 1, 1, 1]]),
            np.array([[0, 2, 3, 0, 0], [0, 0, 0, 0, 9]])]
  sets = oracle.family_resident(counts, ["a", "b", "a"], (2, 3))
  assert set(sets) == {"a", "b"}
  # a: layer 0 sums [5, 2, 4, 0, 0] -> 0, 2; layer 1 sums [0, 0, 0, 9, 10] -> 4, 3, then a tie at 0: id 0
  assert [s.tolist() for s in sets["a"]] == [[0, 2], [4, 3, 0]]
  # b: layer 0 ties 3 and 4 (lower id first); layer 1 all tied -> 0, 1, 2
  assert [s.tolist() for s in sets["b"]] == [[3, 4], [0, 1, 2]]
  assert all(s.dtype == np.int32 for s in sets["a"])
  with pytest.raises(ValueError, match="2 count arrays for 3 requests"):
    oracle.family_resident(counts[:2], ["a", "b", "a"], (2, 3))
  with pytest.raises(ValueError, match=r"counts must be \[L=3, E\]"):
    oracle.family_resident(counts, ["a", "b", "a"], (2, 3, 1))


def test_run_starts_are_the_changes_of_family():
  assert oracle.run_starts(["a", "a", "b", "b", "a", "c"]) == [0, 2, 4, 5]
  assert oracle.run_starts([]) == []


def test_gain_ratio():
  base = np.zeros(20)
  ceiling = np.r_[np.ones(10), np.zeros(10)]  # ceiling gains 0.5
  a = np.r_[np.ones(5), np.zeros(15)]  # a gains 0.25: half of it
  r = gain_ratio(a, ceiling, base)
  assert r.ratio == pytest.approx(0.5) and r.n == 20
  assert r.low is not None and r.high is not None and 0 <= r.low <= 0.5 <= r.high <= 1
  assert gain_ratio(a, base, base).ratio is None  # the ceiling gains nothing: nothing to capture
  # a ceiling that gains on one request of many: some resamples gain nothing -> unbounded above
  one = np.r_[1.0, np.zeros(19)]
  r = gain_ratio(one, one, base)
  assert r.ratio == pytest.approx(1.0) and r.high is None
  with pytest.raises(ValueError, match="one length"):
    gain_ratio(a, ceiling[:3], base)


# --- pin_experts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned():
  return load(default_checkpoint(), experts=3, policy="pruned", planner="uniform", **LIMITS)  # 3 in every layer


def _prompts(model, n, seed=0):
  reqs = make_requests(model.tokenizer, [(ex.prompt, ex.answer) for ex in tasks.make_examples(n, seed=seed)],
                       src_len=evaluate.SRC_LEN, tgt_len=evaluate.NEW_TOKENS)
  return [(r.ids, r.mask) for r in reqs]


def _device_residents(model) -> list[list[int]]:
  """Per MoE layer, the experts whose slots hold their weights (checked against the host store) and
  whose index map points at those slots, read from the device's slot state."""
  flat = decode.Flat.of(model.slots)
  out = []
  for layer, (a, b, m) in enumerate(slot_leaf_positions(flat, model.config.moe_layers)):
    wi, wo, slot_of = (np.asarray(flat.leaves[j]) for j in (a, b, m))
    experts = np.flatnonzero(slot_of >= 0)
    assert len(experts) == wi.shape[0]  # every slot is indexed
    for e in experts:
      want_wi, want_wo = model.store.expert(layer, e)
      np.testing.assert_array_equal(wi[slot_of[e]], want_wi.astype(wi.dtype))
      np.testing.assert_array_equal(wo[slot_of[e]], want_wo.astype(wo.dtype))
    out.append(sorted(experts.tolist()))
  return out


def test_pin_sets_exactly_the_given_experts_without_recompiling(pruned):
  model = pruned
  layers = model.config.num_moe_layers
  initial = [sorted(r) for r in model.stats.resident]
  assert _device_residents(model) == initial
  (ids, mask), (ids2, mask2) = _prompts(model, 2)
  start = len(_BACKEND_COMPILES)
  first = model.generate(ids, mask, max_new_tokens=16)  # warm-up: the decode programs compile
  assert len(_BACKEND_COMPILES) > start, "the compile counter counts nothing"
  pin_a = [[0, 1, 2]] * layers
  pin_b = [np.asarray([15, 3, 9 + l], np.int32) for l in range(layers)]  # any order, any int dtype
  steps = decode.decode_steps._cache_size()
  model.pin_experts(pin_a)  # the first pin compiles the one-slot write program (pruned has no executor)
  before = len(_BACKEND_COMPILES)
  out_a = model.generate(ids, mask, max_new_tokens=16)
  model.generate(ids2, mask2, max_new_tokens=16)
  assert model.stats.resident == [[0, 1, 2]] * layers
  assert _device_residents(model) == [[0, 1, 2]] * layers
  assert [model.residency.controller.state.resident(l) for l in range(layers)] == [[0, 1, 2]] * layers
  model.pin_experts(pin_b)
  want_b = [sorted(p.tolist()) for p in pin_b]
  assert model.stats.resident == want_b and _device_residents(model) == want_b
  model.generate(ids, mask, max_new_tokens=16)
  model.pin_experts([[2, 0, 1]] * layers)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=16), out_a)  # same set, same tokens
  model.pin_experts(initial)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=16), first)
  assert len(_BACKEND_COMPILES) == before, "a pin or the decode after it compiled"
  assert decode.decode_steps._cache_size() == steps
  model.residency.controller.state.check()
  # the copies count as swaps: an expert per (layer, expert) that comes in; the 3 of pin_b are new to
  # {0, 1, 2} in every layer (out and back), the initial set in as many as it does not share
  moved = sum(len(set(i) - {0, 1, 2}) for i in initial)
  assert model.stats.summary()["experts_swapped"] == 2 * moved + 2 * 3 * layers


@pytest.mark.parametrize("resident, message", [
    ([[0, 1, 2]] * 3, r"one set of expert ids per MoE layer \(4\), got 3"),
    ([[0, 1]] + [[0, 1, 2]] * 3, r"layer 0: 2 experts given for 3 slots"),
    ([[0, 1, 2]] * 3 + [[0, 1, 16]], r"layer 3: expert ids must be in \[0, 16\)"),
    ([[0, 1, 2]] * 3 + [[0, -1, 2]], r"layer 3: expert ids must be in \[0, 16\)"),
    ([[0, 1, 2], [4, 4, 5]] + [[0, 1, 2]] * 2, r"layer 1: expert ids repeat in \[4, 4, 5\]"),
    ([[0.0, 1.0, 2.0]] * 4, r"layer 0: resident experts must be a 1-D array of integer ids"),
    ([[[0, 1, 2]]] * 4, r"layer 0: resident experts must be a 1-D array of integer ids"),
    (3, r"one set of expert ids per MoE layer \(4\), got int"),
])
def test_a_bad_pin_is_refused_and_changes_nothing(pruned, resident, message):
  held = [list(r) for r in pruned.stats.resident]
  slots = pruned.slots
  with pytest.raises(ValueError, match=message):
    pruned.pin_experts(resident)
  assert pruned.stats.resident == held
  assert pruned.slots is not None and jax.tree.leaves(pruned.slots)[0] is jax.tree.leaves(slots)[0]


def test_swapmoe_can_be_pinned_and_moves_on_by_itself():
  model = load(default_checkpoint(), experts=3, policy="swapmoe", planner="uniform", **LIMITS)
  layers = model.config.num_moe_layers
  pin = [[13, 14, 15]] * layers
  model.pin_experts(pin)
  assert model.stats.resident == pin and _device_residents(model) == pin
  for ids, mask in _prompts(model, 3, seed=4):
    model.generate(ids, mask, max_new_tokens=16)
  # the controller moved on from the pin (to the experts these requests wanted), through its own
  # swaps, with slots, index maps and telemetry in agreement
  assert model.stats.resident != pin
  assert _device_residents(model) == [sorted(r) for r in model.stats.resident]
  model.residency.controller.state.check()


# --- the oracle in the evaluation ----------------------------------------------------------------------
def test_oracle_evaluation_end_to_end():
  """On the built-in model (whatever its weights): the oracle's sets are the per-family top-K of full's
  routing on these requests, it pins once per run (twice: generation and teacher forcing), and it
  redirects fewer tokens than pruned on the same requests."""
  n = 16
  rows = evaluate.evaluate(default_checkpoint(), experts=(3,), policies=("full", "swapmoe", "pruned", "oracle"),
                           gates=("original",), streams=("runs",), requests=n)
  by = {r["policy"]: r for r in rows}
  assert set(by) == {"full", "swapmoe", "pruned", "oracle"}
  o, p, s = by["oracle"], by["pruned"], by["swapmoe"]
  examples = tasks.request_stream(n, "runs")
  families = [ex.family for ex in examples]
  assert o["pins"] == 2 * len(oracle.run_starts(families)) and o["experts_swapped"] > 0
  # recompute the hindsight sets from a fresh run of full
  full = load(default_checkpoint(), **LIMITS)
  reqs = make_requests(full.tokenizer, [(ex.prompt, ex.answer) for ex in examples], src_len=evaluate.SRC_LEN,
                       tgt_len=evaluate.NEW_TOKENS)
  rec = oracle.WantedRecorder(full)
  run_stream(full, reqs, max_new_tokens=evaluate.NEW_TOKENS, after_batch=rec)
  assert len(rec.per_request) == n and all(c.sum() > 0 for c in rec.per_request)
  # K_l of the plan the evaluation's models get (the built-in model's stored calibration spreads 3 per layer)
  slots = load(default_checkpoint(), experts=3, policy="pruned", **LIMITS).plan.slots_per_layer
  want = oracle.family_resident(rec.per_request, families, slots)
  assert o["oracle_resident"] == {f: [x.tolist() for x in v] for f, v in want.items()}
  assert o["redirect_rate"] <= p["redirect_rate"]
  assert o["slots"] == p["slots"] == s["slots"] == 3 and o["gate"] == "original"
  assert o["vs_pruned"]["diff"] == pytest.approx(o["exact_match"] - p["exact_match"])
  assert s["vs_oracle"]["diff"] == pytest.approx(s["exact_match"] - o["exact_match"])
  (b,) = oracle.bound(rows)
  assert (b["oracle"], b["pruned"], b["swapmoe"], b["full"]) == (
      o["exact_match"], p["exact_match"], s["exact_match"], by["full"]["exact_match"])
  if o["exact_match"] > p["exact_match"]:
    assert b["captured"]["ratio"] == pytest.approx(
        (s["exact_match"] - p["exact_match"]) / (o["exact_match"] - p["exact_match"]))
  else:
    assert b["captured"]["ratio"] is None
  md = evaluate.markdown(rows)
  assert "| runs | oracle | original | 3/16" in md and "captured [95% CI]" in md


def test_evaluation_passes_prefill_refit_to_the_swapping_rows_only():
  rows = evaluate.evaluate(default_checkpoint(), experts=(3,), policies=("full", "swapmoe", "pruned"),
                           gates=("original",), streams=("runs",), requests=8, prefill_refit=0.0)
  by = {r["policy"]: r for r in rows}
  assert by["swapmoe"]["prefill_refit"] == 0.0
  assert "prefill_refit" not in by["pruned"] and "prefill_refit" not in by["full"]
  plain = evaluate.evaluate(default_checkpoint(), experts=(3,), policies=("swapmoe",), gates=("original",),
                            streams=("runs",), requests=8)
  # Refitting every request's encoder moves more experts than the controller alone.
  assert by["swapmoe"]["experts_swapped"] > plain[0]["experts_swapped"]


def test_evaluation_passes_fallback_bits_to_the_fallback_rows():
  from swapmoe_jax.serving.loader import experts_budget

  rows = evaluate.evaluate(default_checkpoint(), experts=(3,), policies=("fallback", "swapmoe"), gates=("original",),
                           streams=("runs",), requests=4, fallback_bits=4)
  by = {r["policy"]: r for r in rows}
  assert by["fallback"]["fallback_bits"] == 4 and "fallback_bits" not in by["swapmoe"]
  shape = dict(max_batch_size=1, max_source_len=evaluate.SRC_LEN, max_new_tokens=evaluate.NEW_TOKENS)
  assert by["fallback"]["budget_bytes"] == experts_budget(default_checkpoint(), 3, policy="fallback", fallback_bits=4,
                                                          **shape)


def test_evaluation_passes_selective_encoder_to_the_selective_rows():
  rows = evaluate.evaluate(default_checkpoint(), experts=(3,), policies=("selective", "swapmoe"), gates=("original",),
                           streams=("runs",), requests=4, selective_encoder=False)
  by = {r["policy"]: r for r in rows}
  assert by["selective"]["selective_encoder"] is False and "selective_encoder" not in by["swapmoe"]
  assert by["selective"]["redirect_rate"] > 0  # the encoder's misses are redirected
  assert evaluate.row_label(by["selective"]) == "selective 0.5 decoder"
  assert "| selective 0.5 decoder |" in evaluate.markdown(rows)
