"""Swap controllers, residency bookkeeping and telemetry (host-only: numpy, no accelerator)."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapmoe_jax.serving.stats import RoutingStats, StepRecord, Telemetry
from swapmoe_jax.serving.swap import (
    POLICIES, DecayedFrequencyController, ImportanceSwapController, LRUController, ResidencyError, ResidencyState,
    SlotWrite, StaticController, make_controller, pruned_resident)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stats_from(importance, wanted=None) -> RoutingStats:
  """RoutingStats where every expert with importance was wanted by one token and served."""
  importance = np.asarray(importance, dtype=np.float32)
  wanted = (importance > 0).astype(np.int32) if wanted is None else np.asarray(wanted, dtype=np.int32)
  return RoutingStats(importance, wanted, wanted, np.zeros(importance.shape[0], np.int32))


def used_stats(num_experts: int, used_per_layer) -> RoutingStats:
  wanted = np.zeros((len(used_per_layer), num_experts), np.int32)
  for layer, used in enumerate(used_per_layer):
    wanted[layer, list(used)] = 1
  return stats_from(wanted.astype(np.float32), wanted)


def run_step(controller, stats):
  controller.observe(stats)
  writes = controller.next_writes()
  controller.commit(writes)
  return writes


# --- ResidencyState ---------------------------------------------------------------------------------


def test_residency_state_index_map():
  state = ResidencyState(6, [3, 2], [[4, 0], [5, 1]])
  assert state.slot_expert[0].tolist() == [4, 0, -1]
  assert state.index_map(0).tolist() == [1, -1, -1, -1, 0, -1]
  assert state.index_map(1).tolist() == [-1, 1, -1, -1, -1, 0]
  assert state.index_map(0).dtype == np.int32 and state.resident(1) == [1, 5]
  with pytest.raises(ValueError):
    state.slot_expert[0][0] = 3  # read-only: change residency through apply()
  with pytest.raises(ResidencyError):
    ResidencyState(6, [2], [[1, 1]])
  with pytest.raises(ResidencyError):
    ResidencyState(6, [2], [[1, 2, 3]])


@FAST
@given(num_experts=st.integers(1, 8), slots=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 7), st.booleans()),
                    max_size=40))
def test_residency_invariants_under_random_writes(num_experts, slots, ops):
  slots = [min(k, num_experts) for k in slots]
  state = ResidencyState(num_experts, slots)
  for layer, slot, expert, stale in ops:
    layer = layer % len(slots)
    slot, expert = slot % slots[layer], expert % num_experts
    before = [s.copy() for s in state.slot_expert]
    evicted = int(before[layer][slot]) + (1 if stale else 0)
    valid = not stale and expert not in before[layer]
    if valid:
      state.apply([SlotWrite(layer, slot, expert, evicted)])
      assert state.slot_expert[layer][slot] == expert
    else:
      with pytest.raises(ResidencyError):
        state.apply([SlotWrite(layer, slot, expert, evicted)])
      assert all(np.array_equal(a, b) for a, b in zip(before, state.slot_expert))  # atomic
    state.check()
    for l, k in enumerate(slots):
      index = state.index_map(l)
      for s, e in enumerate(state.slot_expert[l]):
        assert e == -1 or index[e] == s
      assert np.sum(index >= 0) == np.sum(state.slot_expert[l] >= 0)


# --- ImportanceSwapController (swapmoe) -------------------------------------------------------------


def test_importance_accumulates_with_decay_per_active_layer():
  c = ImportanceSwapController(4, [2, 2], [[0, 1], [0, 1]], update_every=100, decay=0.5)
  c.observe(stats_from([[1, 2, 0, 0], [0, 0, 4, 0]]))
  c.observe(stats_from([[0, 0, 8, 0], [0, 0, 0, 0]]))  # layer 1 saw no tokens: kept, not decayed
  np.testing.assert_allclose(c.scores, [[0.5, 1, 8, 0], [0, 0, 4, 0]])


def test_target_is_top_k_after_update_every_calls_ties_prefer_resident():
  c = ImportanceSwapController(6, [3], [[0, 1, 2]], update_every=3, max_swaps_per_step=3, decay=1.0)
  imp = [[1, 1, 0, 5, 4, 1]]
  for _ in range(2):
    c.observe(stats_from(imp))
    assert c.targets[0].tolist() == [0, 1, 2] and c.next_writes() == []  # not yet an update
  c.observe(stats_from(imp))
  # 3 and 4 lead; experts 0, 1 and 5 tie, and resident 0 wins over 5, then the lower id over 1.
  assert c.targets[0].tolist() == [0, 3, 4] and c.target_updates == 1


def test_eviction_lowest_importance_first_and_gain_priority():
  c = ImportanceSwapController(8, [4, 4], [[0, 1, 2, 3], [0, 1, 2, 3]], update_every=1, max_swaps_per_step=1,
                               decay=1.0)
  c.observe(stats_from([[5, 1, 3, 2, 9, 8, 0, 0], [4, 3, 2, 1, 0, 0, 0, 50]]))
  writes = [run_step(c, stats_from(np.zeros((2, 8)))) for _ in range(3)]
  # Layer 1's gain (49 of 60) beats layer 0's (8 of 28); in layer 0 the lowest resident goes first.
  assert writes == [[SlotWrite(1, 3, 7, 3)], [SlotWrite(0, 1, 4, 1)], [SlotWrite(0, 3, 5, 3)]]
  assert c.state.resident(0) == [0, 2, 4, 5] and c.state.resident(1) == [0, 1, 2, 7]


@pytest.mark.parametrize("hysteresis, challenger, swaps", [
    (0.0, 5.5, True),  # the paper's top-K: any higher score swaps
    (0.5, 7.0, False),  # 7 < 1.5 * 5 = 7.5: the resident stays
    (0.5, 8.0, True),  # 8 > 7.5
    (1.0, 9.0, False),
    (1.0, 10.5, True),
])
def test_hysteresis_needs_the_incoming_score_above_the_margin(hysteresis, challenger, swaps):
  c = ImportanceSwapController(4, [2], [[0, 1]], update_every=1, max_swaps_per_step=2, decay=1.0,
                               hysteresis=hysteresis)
  c.observe(stats_from([[9, 5, challenger, 0]]))
  writes = c.next_writes()
  assert writes == ([SlotWrite(0, 1, 2, 1)] if swaps else [])
  assert c.targets[0].tolist() == ([0, 2] if swaps else [0, 1])


@pytest.mark.parametrize("term, targets", [
    ("eq1", [0, 2]),  # Eq. 1: expert 2's two heavy tokens (10) beat expert 1's five light ones (5)
    ("counts", [0, 1]),  # tokens: 5 beat 2
    ("routed", [0, 1]),  # Eq. 1 / the expert's norm: 5 / 1 beat 10 / 4
])
def test_importance_terms_rank_by_what_they_sum(term, targets):
  c = ImportanceSwapController(4, [2], [[0, 3]], update_every=1, max_swaps_per_step=2, decay=1.0,
                               term=term, expert_norms=np.array([[1.0, 1.0, 4.0, 1.0]]))
  c.observe(stats_from([[20, 5, 10, 0]], wanted=[[9, 5, 2, 0]]))
  assert sorted(c.targets[0].tolist()) == targets


def test_importance_term_checks():
  assert make_controller("swapmoe", 4, [2]).term == "eq1"
  assert make_controller("fallback", 4, [2], importance_term="counts").term == "counts"
  with pytest.raises(ValueError, match="importance_term applies to"):
    make_controller("lfu", 4, [2], importance_term="counts")
  with pytest.raises(ValueError, match="importance_term must be one of eq1, counts, routed"):
    make_controller("swapmoe", 4, [2], importance_term="gates")
  with pytest.raises(ValueError, match="needs the experts' norms"):
    make_controller("swapmoe", 4, [2], importance_term="routed")


def test_hysteresis_defaults_and_checks():
  from swapmoe_jax.serving.swap import DEFAULT_HYSTERESIS

  # `load`'s controllers get the serving default; the class alone keeps the paper's rule.
  assert make_controller("swapmoe", 4, [2]).hysteresis == DEFAULT_HYSTERESIS > 0
  assert make_controller("selective", 4, [2], hysteresis=0.25).hysteresis == 0.25
  assert ImportanceSwapController(4, [2], None).hysteresis == 0.0
  with pytest.raises(ValueError, match="hysteresis applies to"):
    make_controller("lru", 4, [2], hysteresis=0.5)
  for bad in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="hysteresis must be"):
      ImportanceSwapController(4, [2], None, hysteresis=bad)


@FAST
@given(num_experts=st.integers(2, 12), slots=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       max_swaps=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_converges_within_ceil_changes_over_max_swaps(num_experts, slots, max_swaps, seed):
  rng = np.random.default_rng(seed)
  slots = [min(k, num_experts) for k in slots]
  initial = [rng.permutation(num_experts)[:k] for k in slots]
  c = ImportanceSwapController(num_experts, slots, initial, update_every=1, max_swaps_per_step=max_swaps)
  importance = rng.permutation(len(slots) * num_experts).reshape(len(slots), num_experts) + 1.0  # distinct
  c.observe(stats_from(importance))
  target = [set(np.argsort(-row)[:k].tolist()) for row, k in zip(importance, slots)]
  assert [set(t.tolist()) for t in c.targets] == target
  changes = sum(len(t - set(i.tolist())) for t, i in zip(target, initial))
  for _ in range(math.ceil(changes / max_swaps)):
    writes = c.next_writes()
    assert len(writes) <= max_swaps
    c.commit(writes)
  assert [set(c.state.resident(l)) for l in range(len(slots))] == target
  assert c.next_writes() == [] and c.swaps_committed == changes


@FAST
@given(seed=st.integers(0, 2**31), max_swaps=st.integers(1, 3), policy=st.sampled_from(["swapmoe", "lru", "lfu"]))
def test_amortization_limit_holds_every_step_with_late_commits(seed, max_swaps, policy):
  rng = np.random.default_rng(seed)
  c = make_controller(policy, 10, [3, 5, 1], [[0, 1, 2], [0, 1, 2, 3, 4], [9]], update_every=2,
                      max_swaps_per_step=max_swaps)
  for _ in range(30):
    imp = rng.gamma(0.3, size=(3, 10)) * (rng.random((3, 10)) < 0.4)
    c.observe(stats_from(imp))
    writes = c.next_writes()
    assert len(writes) <= max_swaps and len(c.pending) <= max_swaps
    busy = [(w.layer, w.slot) for w in c.pending]
    assert len(set(busy)) == len(busy)  # a slot is never written twice while in flight
    landed = [w for w in c.pending if rng.random() < 0.5]  # copies land late and out of order
    c.commit(landed)
    for l in range(3):
      planned = c.planned_slots(l)
      assert len(set(planned[planned >= 0].tolist())) == np.sum(planned >= 0)
    c.state.check()


def test_pending_writes_are_not_replanned():
  c = ImportanceSwapController(8, [4], [[0, 1, 2, 3]], update_every=1, max_swaps_per_step=3, decay=1.0)
  c.observe(stats_from([[1, 1, 1, 1, 5, 6, 7, 0]]))
  first = c.next_writes()
  assert [w.expert for w in first] == [6, 5, 4]
  assert c.next_writes() == []  # all staging slots busy
  c.commit(first[:1])
  c.observe(stats_from([[0, 0, 0, 0, 0, 0, 0, 1000]]))  # 7 now leads; 4 and 5 are still in flight
  again = c.next_writes()
  assert len(again) == 1 and again[0].expert == 7
  assert again[0].slot not in {w.slot for w in c.pending if w != again[0]}
  assert again[0].evicted in c.state.slot_expert[0]
  with pytest.raises(ResidencyError, match="not pending"):
    c.commit([SlotWrite(0, 1, 7, 99)])
  c.cancel(first[1:2])
  assert first[1] not in c.pending and c.swaps_cancelled == 1
  c.commit(c.pending)
  c.state.check()
  assert c.swaps_planned == 4 and c.swaps_committed == 3


def test_empty_slots_fill_first():
  c = ImportanceSwapController(5, [3], [[2]], update_every=1, max_swaps_per_step=1)
  c.observe(stats_from([[0, 0, 1, 3, 2]]))
  assert run_step(c, stats_from(np.zeros((1, 5)))) == [SlotWrite(0, 1, 3, -1)]
  assert run_step(c, stats_from(np.zeros((1, 5)))) == [SlotWrite(0, 2, 4, -1)]


def test_observe_reports_hits_and_misses():
  c = ImportanceSwapController(4, [2], [[0, 1]])
  assert c.observe(stats_from([[1, 0, 2, 3]])) == (1, 2)
  with pytest.raises(ValueError, match="stats"):
    c.observe(stats_from(np.ones((2, 4))))


# --- exact-routing policies -------------------------------------------------------------------------


def test_lru_evicts_least_recent_loads_most_recent_misses_first():
  c = LRUController(6, [3], [[0, 1, 2]], max_swaps_per_step=1)
  run_step(c, used_stats(6, [[0]]))
  run_step(c, used_stats(6, [[1]]))
  run_step(c, used_stats(6, [[2]]))
  assert run_step(c, used_stats(6, [[3]])) == [SlotWrite(0, 0, 3, 0)]  # 0 is least recently used
  c.observe(used_stats(6, [[4]]))
  c.observe(used_stats(6, [[5, 3]]))  # 3 in use now; 4 and 5 missed
  writes = c.next_writes()
  assert writes == [SlotWrite(0, 1, 5, 1)]  # most recent miss first, evicting the LRU (1)
  c.commit(writes)
  assert c.next_writes() == [SlotWrite(0, 2, 4, 2)]


def test_lru_never_evicts_experts_used_in_the_last_step():
  c = LRUController(4, [2], [[0, 1]], max_swaps_per_step=2)
  c.observe(used_stats(4, [[0, 1, 2, 3]]))
  assert c.next_writes() == []
  assert c.observe_used(0, [2, 0]) == [2]


@FAST
@given(policy=st.sampled_from(["lru", "lfu"]), seed=st.integers(0, 2**31))
def test_exact_policies_keep_the_best_scored_experts_when_swaps_are_unlimited(policy, seed):
  rng = np.random.default_rng(seed)
  c = make_controller(policy, 8, [3, 1, 8], [[0, 1, 2], [0], range(8)], max_swaps_per_step=64)
  for _ in range(12):
    used = [np.flatnonzero(rng.random(8) < 0.3) for _ in range(3)]
    run_step(c, used_stats(8, used))
    for l in range(3):
      resident = c.state.resident_mask()[l]
      if (~resident).any():
        assert c.scores[l, resident].min() >= c.scores[l, ~resident].max()  # LRU: recency; LFU: frequency


def test_lfu_keeps_frequent_experts_over_one_off_use():
  lru = LRUController(4, [2], [[0, 1]], max_swaps_per_step=1)
  lfu = DecayedFrequencyController(4, [2], [[0, 1]], max_swaps_per_step=1, decay=0.9)
  for c in (lru, lfu):
    for _ in range(5):
      run_step(c, used_stats(4, [[0, 1]]))
    c.observe(used_stats(4, [[2]]))
  assert lfu.next_writes() == [] and len(lru.next_writes()) == 1
  for _ in range(20):  # 2 becomes the frequent one; 0 and 1 fade
    run_step(lfu, used_stats(4, [[0, 2]]))
  assert lfu.state.resident(0) == [0, 2]


def test_static_policies_never_write():
  norms = np.array([[1.0, 5.0, 3.0, 5.0], [9.0, 0.0, 1.0, 2.0]])
  resident = pruned_resident(norms, [2, 3])
  assert [r.tolist() for r in resident] == [[1, 3], [0, 3, 2]]
  c = make_controller("pruned", 4, [2, 3], resident)
  assert isinstance(c, StaticController)
  for _ in range(3):
    c.observe(stats_from(np.ones((2, 4))))
    assert c.next_writes() == []
  full = make_controller("full", 4, [4, 4])
  assert full.state.resident(1) == [0, 1, 2, 3] and full.observe(stats_from(np.ones((2, 4)))) == (8, 0)
  with pytest.raises(ValueError):
    make_controller("full", 4, [2, 4])


def test_make_controller_knows_every_policy():
  for policy in POLICIES:
    slots = [4, 4] if policy == "full" else [2, 3]
    assert make_controller(policy, 4, slots).policy == policy
  with pytest.raises(ValueError, match="unknown policy"):
    make_controller("fifo", 4, [2])


# --- stats and telemetry ----------------------------------------------------------------------------


def test_routing_stats_merge_sums():
  a = RoutingStats(np.ones((2, 3), np.float32), np.ones((2, 3), np.int32), np.ones((2, 3), np.int32),
                   np.array([1, 0], np.int32))
  m = a.merge(a).merge(RoutingStats.zeros(2, 3))
  assert m.tokens_routed == 12 and m.redirected.tolist() == [2, 0] and m.importance.sum() == 12
  with pytest.raises(ValueError):
    a.merge(RoutingStats.zeros(3, 3))
  with pytest.raises(ValueError):
    RoutingStats(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones(3))


def test_telemetry_totals_rates_and_report():
  t = Telemetry("swapmoe")
  s = RoutingStats(np.ones((2, 4)), np.full((2, 4), 3), np.full((2, 4), 3), [4, 2])
  t.add(StepRecord.from_stats(0, s, hits=6, misses=2, experts_swapped=2, bytes_swapped=2 * 10**7,
                              transfer_s=0.001, wait_s=0.0002))
  t.add(StepRecord.from_stats(1, RoutingStats.zeros(2, 4), hits=2))
  t.set_resident([np.array([3, -1, 1], np.int32), np.array([0, 2], np.int32)])
  s = t.summary()
  assert s["steps"] == 2 and s["tokens_routed"] == 24 and s["redirected"] == 6
  assert s["redirect_rate"] == pytest.approx(0.25) and s["hit_rate"] == pytest.approx(0.8)
  assert s["bytes_swapped"] == 2 * 10**7 and s["transfer_gb_per_s"] == pytest.approx(20.0)
  assert s["resident"] == [[1, 3], [0, 2]]
  assert json.loads(t.to_json(records=True))["records"][0]["hits"] == 6
  text = str(t)
  assert "25.00%" in text and "80.0%" in text and "[1, 3]" in text
