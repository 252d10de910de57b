"""Budget parsing, memory accounting and the planners (host-only: numpy, no accelerator)."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from swapmoe_jax.serving.budget import (
    GiB, MiB, Budget, BudgetError, budget_for_experts, dense_param_count, dtype_size, expert_bytes_each, format_bytes,
    full_model_bytes, kv_cache_bytes, memory_breakdown, min_budget_bytes, parse_budget, RUNTIME_RESERVE_BYTES,
    ALLOCATOR_MARGIN_EXPERTS, ALLOCATOR_MARGIN_PERCENT)
from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.serving.planner import (
    DEFAULT_MAX_SWAPS_PER_STEP, layer_coverage, local_search, plan_calibrated, plan_explicit, plan_full, plan_uniform)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = SwitchConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=4, num_decoder_layers=4,
                    num_experts=8, expert_capacity=8)


# --- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GiB), ("4.5 GiB", int(4.5 * GiB)), ("512MiB", 512 * MiB), ("3GB", 3 * 10**9),
    ("1e9", 10**9), (10**9, 10**9), (4.5e9, 4_500_000_000), (np.int64(12345), 12345), ("0.3GB", 300_000_000),
    ("  2 gib ", 2 * GiB), ("1_000", 1000), ("4G", 4 * GiB), ("100 B", 100), ("1.5KB", 1500),
])
def test_parse_absolute(text, expected):
  assert parse_budget(text).resolve(1) == expected


@pytest.mark.parametrize("text, full, expected", [("33%", 1000, 330), ("100%", 12345, 12345),
                                                  ("50%", 7, 3), ("12.5 %", 800, 100)])
def test_parse_percent_floors(text, full, expected):
  assert parse_budget(text).resolve(full) == expected


@pytest.mark.parametrize("text, message", [
    ("-4GiB", "negative"), ("0", "zero"), ("0%", "zero"), ("0 MiB", "zero"), ("nan", "NaN"),
    (float("nan"), "NaN"), ("inf GiB", "infinite"), ("101%", "above 100%"), ("4 XB", "unknown unit"),
    ("", "malformed"), ("GiB", "malformed"), ("4.5.6GiB", "malformed"), ("four GiB", "malformed"),
    ("0.5", "less than one byte"), (True, "text or a number"), (None, "text or a number"),
])
def test_parse_rejects_with_clear_error(text, message):
  with pytest.raises(BudgetError, match=message):
    parse_budget(text)


def test_budget_error_is_value_error():
  assert issubclass(BudgetError, ValueError)


@FAST
@given(st.one_of(st.integers(1, 2**50).map(lambda n: Budget(absolute_bytes=n)),
                 st.floats(0, 100, exclude_min=True).map(lambda p: Budget(percent=p))))
def test_budget_str_round_trips(budget):
  assert parse_budget(str(budget)) == budget


@FAST
@given(st.integers(1, 2**45))
@example(1070)  # "1.04 KiB" = 1064.96 bytes, floored to 1064: the mantissa's rounding plus the floor
def test_format_bytes_round_trips_within_rounding(n):
  parsed = parse_budget(format_bytes(n).replace(" ", "")).resolve(1)
  # Two decimals of a mantissa >= 1 are within 0.5 % of n; parsing floors to whole bytes (a budget is
  # a ceiling), one byte more.
  assert abs(parsed - n) <= 0.005 * n + 1


@FAST
@given(st.text(max_size=12))
def test_parse_garbage_raises_only_budget_error(text):
  try:
    budget = parse_budget(text)
  except BudgetError:
    return
  assert budget.resolve(10**6) > 0


def test_dtype_size():
  assert (dtype_size(2), dtype_size("bfloat16"), dtype_size("float32"), dtype_size(np.float16)) == (2, 2, 4, 2)


# --- parameter counts -------------------------------------------------------------------------------


def converter_dense_tree(c: SwitchConfig) -> dict[str, tuple[int, ...]]:
  """The dense tree the model holds, as path -> shape (independent of budget.py's arithmetic)."""
  d, hc, v = c.d_model, c.num_heads * c.d_kv, c.vocab_size
  if c.tie_word_embeddings:
    tree = {"shared": (v, d)}
  else:  # transformers 5: untied stacks have their own input embeddings, and `shared` is unused
    tree = {"lm_head": (d, v), "encoder/embed": (v, d), "decoder/embed": (v, d)}
  for stack, n, sparse in (("encoder", c.num_layers, c.encoder_sparse_layers),
                           ("decoder", c.num_decoder_layers, c.decoder_sparse_layers)):
    tree[f"{stack}/rel_bias"] = (c.relative_attention_num_buckets, c.num_heads)
    tree[f"{stack}/final_norm"] = (d,)
    for i in range(n):
      p = f"{stack}/blocks/{i}"
      tree[f"{p}/attn_norm"] = (d,)
      for name, shape in (("q", (d, hc)), ("k", (d, hc)), ("v", (d, hc)), ("o", (hc, d))):
        tree[f"{p}/attn/{name}"] = shape
        if stack == "decoder":
          tree[f"{p}/cross/{name}"] = shape
      if stack == "decoder":
        tree[f"{p}/cross_norm"] = (d,)
      tree[f"{p}/ffn_norm"] = (d,)
      if i in sparse:
        tree[f"{p}/router/w"] = (d, c.num_experts)
        if c.router_bias:
          tree[f"{p}/router/b"] = (c.num_experts,)
      else:
        tree[f"{p}/mlp/wi"] = (d, c.d_ff)
        tree[f"{p}/mlp/wo"] = (c.d_ff, d)
  return tree


configs = st.builds(
    SwitchConfig, vocab_size=st.integers(2, 3000), d_model=st.integers(1, 96), d_kv=st.integers(1, 16),
    d_ff=st.integers(1, 256), num_heads=st.integers(1, 6), num_layers=st.integers(1, 6),
    num_decoder_layers=st.integers(1, 6), num_experts=st.integers(1, 40), encoder_sparse_step=st.integers(1, 3),
    decoder_sparse_step=st.integers(1, 3), relative_attention_num_buckets=st.integers(1, 40),
    router_bias=st.booleans(), tie_word_embeddings=st.booleans())


@FAST
@given(configs)
def test_dense_param_count_matches_converter_tree(config):
  tree = converter_dense_tree(config)
  assert dense_param_count(config) == sum(math.prod(s) for s in tree.values())
  experts = config.num_moe_layers * config.num_experts * config.expert_param_count()
  routers = config.num_moe_layers * (config.d_model + config.router_bias) * config.num_experts
  small = config.num_moe_layers * 2 * config.num_experts  # expert norms + index map, 4 bytes each
  assert full_model_bytes(config, 2) == 2 * (dense_param_count(config) - routers + experts) + 4 * (routers + small)


@pytest.mark.parametrize("tie, router_bias", [(True, False), (False, True)])
def test_dense_param_count_matches_hf_model(tie, router_bias):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  hf_config = transformers.SwitchTransformersConfig(
      vocab_size=97, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=4, num_decoder_layers=3,
      num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, router_bias=router_bias,
      tie_word_embeddings=tie, decoder_start_token_id=0)
  model = transformers.SwitchTransformersForConditionalGeneration(hf_config).eval()
  config = SwitchConfig.from_hf_dict(hf_config.to_dict())
  # named_parameters() lists tied tensors once (as shared.weight). Untied, transformers 5 gives each
  # stack its own embed_tokens and leaves shared.weight unused.
  dense = expert = 0
  for name, p in model.named_parameters():
    if ".experts." in name:
      expert += p.numel()
    elif tie or name != "shared.weight":
      dense += p.numel()
  assert dense_param_count(config) == dense
  assert config.num_moe_layers * config.num_experts * config.expert_param_count() == expert


def test_kv_cache_bytes_counts_self_and_cross_caches():
  b, s, t = 3, 11, 7
  arrays = []
  for _ in range(TINY.num_decoder_layers):
    arrays += [np.empty((b, TINY.num_heads, t, TINY.d_kv), np.float16)] * 2  # self K, V
    arrays += [np.empty((b, TINY.num_heads, s, TINY.d_kv), np.float16)] * 2  # cross K, V
  assert kv_cache_bytes(TINY, 2, b, s, t) == sum(a.nbytes for a in arrays)


def test_memory_breakdown_fields_add_up():
  m = memory_breakdown(TINY, 4, [2, 3, 1, 8], batch=2, src_len=16, tgt_len=8, staging_slots=2)
  one = expert_bytes_each(TINY, 4)
  assert m.expert_bytes == 14 * one and m.staging_bytes == 2 * one
  assert m.dense_bytes == 4 * dense_param_count(TINY) + 4 * 2 * TINY.num_experts * TINY.num_moe_layers
  arrays = m.dense_bytes + m.expert_bytes + m.kv_cache_bytes + m.staging_bytes + m.workspace_bytes
  # Of the arrays, rounded up, plus a chunk term of whole experts.
  assert m.allocator_bytes == -(-arrays * ALLOCATOR_MARGIN_PERCENT // 100) + ALLOCATOR_MARGIN_EXPERTS * one > one
  assert m.total == arrays + m.allocator_bytes
  # The workspace holds at least the encoder's FFN intermediate and attention scores in float32.
  assert m.workspace_bytes >= 4 * (2 * 16 * TINY.d_ff + 2 * TINY.num_heads * 16 * 16) + RUNTIME_RESERVE_BYTES
  with pytest.raises(ValueError):
    memory_breakdown(TINY, 4, [2, 3, 1], 2, 16, 8, 2)
  with pytest.raises(ValueError):
    memory_breakdown(TINY, 4, [9, 3, 1, 8], 2, 16, 8, 2)
  without = memory_breakdown(TINY, 4, [0] * 4, 2, 16, 8, 2)
  assert without.expert_bytes == 0 and without.total < m.total - 14 * one


# --- planners ---------------------------------------------------------------------------------------


def _check_plan(plan, config, budget, dtype_bytes, batch, src, tgt):
  e = config.num_experts
  assert plan.breakdown.total <= budget
  assert plan.staging_slots == plan.max_swaps_per_step
  assert len(plan.slots_per_layer) == config.num_moe_layers
  assert all(1 <= k <= e for k in plan.slots_per_layer)
  assert plan.breakdown == memory_breakdown(config, dtype_bytes, plan.slots_per_layer, batch, src, tgt,
                                            plan.staging_slots)
  if plan.staging_slots:  # maximal: no layer could take one more slot
    for layer, k in enumerate(plan.slots_per_layer):
      if k < e:
        more = list(plan.slots_per_layer)
        more[layer] += 1
        assert memory_breakdown(config, dtype_bytes, more, batch, src, tgt, plan.staging_slots).total > budget
  else:
    assert all(k == e for k in plan.slots_per_layer)


@FAST
@given(config=configs, dtype_bytes=st.sampled_from([2, 4]), batch=st.integers(1, 4), src=st.integers(1, 64),
       tgt=st.integers(1, 64), swaps=st.integers(1, 3), scale=st.floats(0.3, 1.5), data=st.data())
def test_plans_never_exceed_the_budget(config, dtype_bytes, batch, src, tgt, swaps, scale, data):
  full = memory_breakdown(config, dtype_bytes, [config.num_experts] * config.num_moe_layers, batch, src, tgt, 0)
  budget = max(1, int(full.total * scale))
  minimum = min_budget_bytes(config, dtype_bytes, batch, src, tgt, swaps)
  n = config.num_moe_layers * config.num_experts
  importance = np.asarray(data.draw(st.lists(st.floats(0, 1e6), min_size=n, max_size=n)))
  importance = importance.reshape(config.num_moe_layers, config.num_experts)
  for plan_fn, extra in ((plan_uniform, ()), (plan_calibrated, (importance,))):
    try:
      plan = plan_fn(config, budget, dtype_bytes, batch, src, tgt, *extra, max_swaps_per_step=swaps)
    except BudgetError:
      assert budget < minimum and budget < full.total
      continue
    _check_plan(plan, config, budget, dtype_bytes, batch, src, tgt)
  if budget >= full.total:
    assert plan_full(config, budget, dtype_bytes, batch, src, tgt).breakdown == full


def test_uniform_gives_leftover_slots_to_the_first_layers():
  one = expert_bytes_each(TINY, 2)
  base = memory_breakdown(TINY, 2, [3] * 4, 1, 16, 8, DEFAULT_MAX_SWAPS_PER_STEP).total
  plan = plan_uniform(TINY, base + 2 * one + one // 2, 2, 1, 16, 8)
  assert plan.slots_per_layer == (4, 4, 3, 3)
  assert plan.method == "uniform" and "K=3" in plan.reason


def test_budget_holding_everything_plans_full_without_staging():
  full = memory_breakdown(TINY, 2, [8] * 4, 1, 16, 8, 0).total
  for plan in (plan_uniform(TINY, full, 2, 1, 16, 8),
               plan_calibrated(TINY, full, 2, 1, 16, 8, np.ones((4, 8))), plan_full(TINY, full, 2, 1, 16, 8)):
    assert plan.slots_per_layer == (8,) * 4 and plan.breakdown.total == full
    assert plan.staging_slots == plan.max_swaps_per_step == 0  # nothing ever swaps
  with pytest.raises(BudgetError, match="full model"):
    plan_full(TINY, full - 1, 2, 1, 16, 8)


def test_too_small_budget_states_the_minimum_and_the_minimum_fits():
  minimum = min_budget_bytes(TINY, 2, 2, 32, 16, DEFAULT_MAX_SWAPS_PER_STEP)
  for plan_fn, extra in ((plan_uniform, ()), (plan_calibrated, (np.ones((4, 8)),))):
    with pytest.raises(BudgetError) as info:
      plan_fn(TINY, minimum - 1, 2, 2, 32, 16, *extra)
    assert str(minimum) in str(info.value) and format_bytes(minimum) in str(info.value)
    plan = plan_fn(TINY, minimum, 2, 2, 32, 16, *extra)
    assert plan.slots_per_layer == (1,) * 4 and plan.breakdown.total == minimum


def test_calibrated_gives_more_slots_to_spread_out_layers():
  importance = np.zeros((4, 8))
  importance[0] = 1.0  # spread over all experts
  importance[1] = [1e6] + [1.0] * 7  # one expert dominates, with a large activation norm
  importance[2] = [4, 4, 4, 4, 0, 0, 0, 0]
  importance[3] = [1, 0, 0, 0, 0, 0, 0, 0]
  twelve = memory_breakdown(TINY, 2, [3] * 4, 1, 16, 8, DEFAULT_MAX_SWAPS_PER_STEP).total  # minimum + 8 slots
  plan = plan_calibrated(TINY, twelve, 2, 1, 16, 8, importance)
  k = plan.slots_per_layer
  assert sum(k) == 12 and k[0] > k[1] and k[2] > k[1] and k[0] > k[3]
  assert k[2] >= 4  # layer 2 is fully covered by four experts before zero-gain slots are handed out
  coverage = layer_coverage(importance, k)
  assert coverage[2] == pytest.approx(1.0)
  assert "coverage" in plan.reason and str(list(k)) in plan.reason


def test_calibrated_rejects_bad_importance():
  with pytest.raises(ValueError, match="shape"):
    plan_calibrated(TINY, 10**9, 2, 1, 16, 8, np.ones((3, 8)))
  with pytest.raises(ValueError, match="non-negative"):
    plan_calibrated(TINY, 10**9, 2, 1, 16, 8, -np.ones((4, 8)))


def test_calibrated_starts_from_the_searched_allocation_that_fits():
  """Stored allocations ({total: K per layer}): at their total the plan is the allocation; with more
  slots it starts there and hands out the rest by coverage (what the coverage greedy would add from
  it); below every stored total, coverage alone decides, as without them."""
  rng = np.random.default_rng(0)
  importance = rng.gamma(0.5, size=(4, 8))
  budget = {k: budget_for_experts(TINY, 2, k, 1, 16, 8, DEFAULT_MAX_SWAPS_PER_STEP) for k in (2, 3, 4)}
  stored = {12: (1, 2, 5, 4)}
  coverage = {k: plan_calibrated(TINY, budget[k], 2, 1, 16, 8, importance).slots_per_layer for k in budget}
  at = plan_calibrated(TINY, budget[3], 2, 1, 16, 8, importance, allocations=stored)
  assert at.slots_per_layer == (1, 2, 5, 4) != coverage[3]
  assert "searched allocation [1, 2, 5, 4] of 12 slots" in at.reason
  _check_plan(at, TINY, budget[3], 2, 1, 16, 8)
  above = plan_calibrated(TINY, budget[4], 2, 1, 16, 8, importance, allocations=stored)
  assert sum(above.slots_per_layer) == 16 and all(a >= s for a, s in zip(above.slots_per_layer, stored[12]))
  shares = importance / importance.sum(axis=1, keepdims=True)
  ranked = -np.sort(-shares, axis=1)
  slots = list(stored[12])
  for _ in range(4):  # the next slot where the next-ranked share is largest
    layer = max((l for l in range(4) if slots[l] < 8), key=lambda l: (ranked[l, slots[l]], -slots[l], -l))
    slots[layer] += 1
  assert above.slots_per_layer == tuple(slots) and "4 more by calibrated importance" in above.reason
  below = plan_calibrated(TINY, budget[2], 2, 1, 16, 8, importance, allocations=stored)
  assert below.slots_per_layer == coverage[2] and "searched" not in below.reason
  with pytest.raises(ValueError, match="allocation for 12 slots"):
    plan_calibrated(TINY, budget[3], 2, 1, 16, 8, importance, allocations={12: (1, 2, 5, 5)})


def test_local_search_climbs_to_the_best_allocation_and_scores_each_once():
  """On a separable concave score, moving one slot at a time reaches the best allocation (checked
  against every allocation of the total); each allocation is scored once; a gain below `min_gain` is
  not taken."""
  import itertools

  weights = np.array([3.0, 0.2, 5.0, 1.0])
  calls = []

  def score(slots):
    calls.append(slots)
    return float(np.sum(weights * np.log(np.asarray(slots, float))))

  every = [s for s in itertools.product(range(1, 9), repeat=4) if sum(s) == 12]
  best = max(every, key=score)
  calls.clear()
  found, trace = local_search((3, 3, 3, 3), score, num_experts=8, max_rounds=20)
  assert found == best and len(calls) == len(set(calls)) == len(trace)
  assert trace[0] == dict(slots=[3, 3, 3, 3], score=score((3, 3, 3, 3)), round=0)
  assert max(t["score"] for t in trace) == score(found)
  stuck, trace = local_search((3, 3, 3, 3), score, num_experts=8, min_gain=100.0)
  assert stuck == (3, 3, 3, 3) and {t["round"] for t in trace} == {0, 1} and len(trace) == 13
  known, trace = local_search((3, 3, 3, 3), score, num_experts=8, max_rounds=1, known={(3, 3, 3, 3): 0.0})
  assert [3, 3, 3, 3] not in [t["slots"] for t in trace] and known != (3, 3, 3, 3)


def test_explicit_slots_are_planned_as_given_and_checked_against_the_budget():
  """K_l as the caller gives it: the same bytes as the uniform plan spread otherwise fit; one slot more
  does not, and the error says how many do; wrong lengths and values are refused."""
  budget = budget_for_experts(TINY, 2, 3, 1, 16, 8, DEFAULT_MAX_SWAPS_PER_STEP)
  plan = plan_explicit(TINY, budget, 2, 1, 16, 8, (5, 3, 2, 2))
  assert plan.slots_per_layer == (5, 3, 2, 2) and plan.method == "explicit"
  assert plan.breakdown == plan_uniform(TINY, budget, 2, 1, 16, 8).breakdown  # same slot count, same bytes
  _check_plan(plan, TINY, budget, 2, 1, 16, 8)
  with pytest.raises(BudgetError, match=r"\(13 experts\) do not fit .* holds 12 over the 4 MoE layers"):
    plan_explicit(TINY, budget, 2, 1, 16, 8, (5, 4, 2, 2))
  with pytest.raises(ValueError, match="one K per MoE layer"):
    plan_explicit(TINY, budget, 2, 1, 16, 8, (4, 4, 4))
  with pytest.raises(ValueError, match=r"in \[1, 8\]"):
    plan_explicit(TINY, budget, 2, 1, 16, 8, (9, 1, 1, 1))
  full = memory_breakdown(TINY, 2, [8] * 4, 1, 16, 8, 0).total
  assert plan_explicit(TINY, full, 2, 1, 16, 8, (8,) * 4).max_swaps_per_step == 0
  with pytest.raises(BudgetError, match="every expert"):
    plan_explicit(TINY, full - 1, 2, 1, 16, 8, (8,) * 4)


@pytest.mark.parametrize("k", range(1, 9))
def test_budget_for_experts_plans_exactly_k_per_layer(k):
  budget = budget_for_experts(TINY, 2, k, 2, 32, 16, DEFAULT_MAX_SWAPS_PER_STEP)
  plan = plan_uniform(TINY, budget, 2, 2, 32, 16)
  assert plan.slots_per_layer == (k,) * 4 and plan.breakdown.total == budget
  if k == 1:  # the minimum budget
    assert budget == min_budget_bytes(TINY, 2, 2, 32, 16, DEFAULT_MAX_SWAPS_PER_STEP)
  elif k < 8:  # one byte less loses a slot somewhere
    assert sum(plan_uniform(TINY, budget - 1, 2, 2, 32, 16).slots_per_layer) == 4 * k - 1
  with pytest.raises(ValueError, match=r"experts_per_layer must be in \[1, 8\], got 9"):
    budget_for_experts(TINY, 2, 9, 2, 32, 16, DEFAULT_MAX_SWAPS_PER_STEP)
