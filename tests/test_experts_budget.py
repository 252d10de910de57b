"""Budgets counted in resident experts ("5/16", `experts=5`, `--experts 5`), and the calibrated
planner's initial residents."""

from __future__ import annotations

import numpy as np
import pytest

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import loader
from swapmoe_jax.serving.planner import DEFAULT_MAX_SWAPS_PER_STEP, plan_uniform

SHAPE = dict(max_batch_size=1, max_source_len=32, max_new_tokens=16)


@pytest.mark.parametrize("text, k, e", [("5/16", 5, 16), (" 1 / 8 ", 1, 8), ("64/64", 64, 64)])
def test_parse_experts_budget(text, k, e):
  b = budget_lib.parse_budget(text)
  assert (b.experts, b.num_experts, b.absolute_bytes, b.percent) == (k, e, None, None)
  assert budget_lib.parse_budget(str(b)) == b


@pytest.mark.parametrize("text, message", [("0/16", r"in \[1, 16\]"), ("17/16", r"in \[1, 16\]"),
                                           ("5/", "malformed"), ("/16", "malformed")])
def test_parse_experts_budget_rejects(text, message):
  with pytest.raises(budget_lib.BudgetError, match=message):
    budget_lib.parse_budget(text)


@pytest.fixture(scope="module")
def folder():
  return default_checkpoint()


@pytest.fixture(scope="module")
def cfg(folder):
  return ckpt.read_metadata(folder).config


@pytest.mark.parametrize("k", [1, 3, 5, 16])
def test_resolve_for_is_the_budget_whose_plan_holds_k(cfg, k):
  shape = dict(batch=1, src_len=32, tgt_len=64)
  b = budget_lib.parse_budget(f"{k}/{cfg.num_experts}").resolve_for(cfg, 2, **shape,
                                                                     staging_slots=DEFAULT_MAX_SWAPS_PER_STEP)
  assert b == budget_lib.budget_for_experts(cfg, 2, k, 1, 32, 64, DEFAULT_MAX_SWAPS_PER_STEP)
  assert plan_uniform(cfg, b, 2, **shape).slots_per_layer == (k,) * cfg.num_moe_layers
  with pytest.raises(budget_lib.BudgetError, match="resolve_for"):
    budget_lib.parse_budget(f"{k}/{cfg.num_experts}").resolve(10**9)


def test_experts_of_another_model_say_what_this_one_has(cfg):
  with pytest.raises(budget_lib.BudgetError, match=f"has {cfg.num_experts} experts per MoE layer; write e.g. "
                                                   f"'5/{cfg.num_experts}'"):
    budget_lib.parse_budget("5/64").resolve_for(cfg, 2, batch=1, src_len=32, tgt_len=64, staging_slots=2)


def test_load_with_experts_holds_k_per_layer_and_equals_the_text_budget(folder, cfg):
  a = swapmoe_jax.load(folder, experts=5, **SHAPE)
  b = swapmoe_jax.load(folder, budget=f"5/{cfg.num_experts}", **SHAPE)
  c = swapmoe_jax.load(folder, budget=swapmoe_jax.experts_budget(folder, 5, **SHAPE), **SHAPE)
  assert a.policy == b.policy == "swapmoe"
  # The built-in model's stored calibration spreads the bytes of 5 per layer over its layers as its
  # searched allocation for that slot count says (at 5 of 16 the equal split; `planner="uniform"`
  # reaches the same by another rule, with residents by norm).
  searched = ckpt.read_allocations(folder, cfg, "swapmoe")[5 * cfg.num_moe_layers]
  assert a.plan.slots_per_layer == b.plan.slots_per_layer == c.plan.slots_per_layer == searched
  assert a.plan.method == "calibrated" and "searched allocation" in a.plan.reason
  assert sum(a.plan.slots_per_layer) == 5 * cfg.num_moe_layers
  assert a.plan.budget_bytes == b.plan.budget_bytes == c.plan.budget_bytes
  uniform = swapmoe_jax.load(folder, experts=5, planner="uniform", **SHAPE)
  assert uniform.plan.slots_per_layer == (5,) * cfg.num_moe_layers and uniform.plan.budget_bytes == a.plan.budget_bytes
  ids = a.tokenizer("max: 3 17 5", return_tensors="np").input_ids
  np.testing.assert_array_equal(a.generate(ids, max_new_tokens=8), c.generate(ids, max_new_tokens=8))


def test_load_experts_bad_input(folder):
  with pytest.raises(ValueError, match="not both"):
    swapmoe_jax.load(folder, budget="33%", experts=5, **SHAPE)
  with pytest.raises(ValueError, match="experts must be an integer >= 1, got 0"):
    swapmoe_jax.load(folder, experts=0, **SHAPE)
  with pytest.raises(budget_lib.BudgetError, match="this model has 16"):
    swapmoe_jax.load(folder, experts=17, **SHAPE)


def test_cli_experts_gives_the_same_answer_as_its_budget(capsys):
  from swapmoe_jax import generate

  assert generate.main(["--experts", "5", "--max-source-len", "32", "--prompt", "max: 3 17 5"]) == 0
  out, err = capsys.readouterr()
  assert out.strip() == "17" and "policy swapmoe" in err
  budget = swapmoe_jax.experts_budget(default_checkpoint(), 5, max_source_len=32, max_new_tokens=32)
  assert f"of budget {budget_lib.format_bytes(budget)}" in err


@pytest.mark.parametrize("args, message", [
    (["--experts", "0"], "--experts must be >= 1"),
    (["--experts", "17"], "this model has 16 experts per MoE layer"),
    (["--experts", "3", "--budget", "33%"], "not allowed with argument"),
    (["--budget", "5/64"], "write e.g. '5/16'"),
])
def test_cli_experts_bad_input_is_one_line(args, message, capsys):
  from swapmoe_jax import generate

  rc = generate.main(args + ["--prompt", "max: 1 2", "--quiet"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_calibrated_planner_starts_from_the_calibration_importance(folder, cfg):
  """The initial residents are the top-K_l by the importance calibration measured (ties by norm), not
  the top-K by norm."""
  tok = swapmoe_jax.load(folder, **SHAPE).tokenizer
  prompts = [tok(p, return_tensors="np").input_ids[0] for p in ("sort: 7 3 9 1 4", "reverse: cat dog sun")]
  model = swapmoe_jax.load(folder, experts=4, policy="pruned", planner="calibrated", calibration_inputs=prompts,
                           **SHAPE)
  meta = ckpt.read_metadata(folder)
  store = model.store
  importance = loader.calibrate(cfg, ckpt.restore_dense(meta), store, prompts, dtype=model.dtype)
  resident = [np.asarray(s) for s in model.residency.controller.state.slot_expert]
  norms = np.asarray(store.norms)
  for layer, (res, imp, norm, k) in enumerate(zip(resident, importance, norms, model.plan.slots_per_layer)):
    got = set(res[res >= 0].tolist())
    assert len(got) == k
    # every resident expert is at least as important as every expert left out; on ties, its norm is larger
    out = [e for e in range(cfg.num_experts) if e not in got]
    for i in got:
      for j in out:
        assert (imp[i], norm[i]) >= (imp[j], norm[j]), (layer, i, j)
  by_norm = loader.initial_resident("pruned", store, model.plan.slots_per_layer)
  assert any(set(r.tolist()) != set(n.tolist()) for r, n in zip(resident, by_norm)), \
      "calibration chose the same sets as the norms: this test proves nothing on this model"


def test_plans_count_the_experts_exact_routing_reads_in_a_step(folder, cfg):
  """lru, lfu and selective copy missing experts from host memory inside a step: one per row of a decode
  step (B·k rows) while those fit `reads_misses_by_row`, else one at a time (the prefill always). Their
  plans count those copies; the other policies' do not; a budget in experts still holds K per layer."""
  from swapmoe_jax.models.decoder.config import DecoderConfig
  from swapmoe_jax.moe import experts as experts_lib

  assert [budget_lib.bank_read_experts(cfg, 2, b) for b in (1, 8, 16, 17)] == [1, 8, 16, 1]
  top2 = DecoderConfig(model_type="qwen2_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, num_experts=6, top_k=2, moe_d_ff=24, sparse_layers=(0, 1))
  assert [budget_lib.bank_read_experts(top2, 2, b) for b in (1, 8, 9)] == [2, 16, 1]
  big = DecoderConfig(model_type="mixtral", vocab_size=64, hidden_size=4096, num_layers=2, num_heads=32,
                      num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, moe_d_ff=14336, sparse_layers=(0, 1))
  one = budget_lib.expert_bytes_each(big, 2)  # 336 MiB: two copies at once exceed MISS_ROWS_MAX_BYTES
  assert 2 * one > experts_lib.MISS_ROWS_MAX_BYTES and budget_lib.bank_read_experts(big, 2, 1) == 1
  assert experts_lib.reads_misses_by_row(16, 1, decode=True) and not experts_lib.reads_misses_by_row(2, 1, decode=False)

  lfu = swapmoe_jax.load(folder, experts=3, policy="lfu", planner="uniform", **SHAPE)
  swapmoe = swapmoe_jax.load(folder, experts=3, policy="swapmoe", planner="uniform", **SHAPE)
  one = lfu.plan.breakdown.one_expert_bytes
  assert lfu.plan.breakdown.bank_read_bytes == one and swapmoe.plan.breakdown.bank_read_bytes == 0
  assert lfu.plan.slots_per_layer == swapmoe.plan.slots_per_layer == (3,) * cfg.num_moe_layers
  assert lfu.plan.budget_bytes == swapmoe_jax.experts_budget(folder, 3, policy="lfu", **SHAPE)
  assert lfu.plan.budget_bytes - swapmoe.plan.budget_bytes >= one  # the copy, plus its allocator share
  assert "read from host memory in a step" in lfu.plan.reason
