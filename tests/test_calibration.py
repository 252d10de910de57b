"""A calibration stored beside a checkpoint (`calibrate_checkpoint`, `calibration.json`): what `load`'s
default planner plans from, and the one the built-in model ships."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.builtin.calibrate import calibration_prompts
from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.serving import loader
from swapmoe_jax.serving import planner as planner_lib

SHAPE = dict(max_batch_size=1, max_source_len=32, max_new_tokens=16)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
  """The built-in checkpoint without its stored calibration (a copy)."""
  folder = str(tmp_path_factory.mktemp("ckpt") / "model")
  shutil.copytree(default_checkpoint(), folder)
  os.remove(os.path.join(folder, ckpt.CALIBRATION_FILE))
  return folder


def _prompts(folder, n=3):
  tok = swapmoe_jax.load(folder, **SHAPE).tokenizer
  return [tok(p, return_tensors="np").input_ids for p in ("sort: 7 3 9 1 4", "reverse: cat dog sun", "max: 3 17 5")[:n]]


def test_stored_calibration_is_what_the_default_planner_plans_from(bare):
  """Without a stored calibration the default is uniform; after `calibrate_checkpoint` the default plans
  K_l and the first residents from the stored importance — the plan and residents that measuring the
  same prompts at load time gives — while planner="uniform" still ignores it."""
  cfg = ckpt.read_metadata(bare).config
  assert swapmoe_jax.load(bare, experts=3, **SHAPE).plan.slots_per_layer == (3,) * cfg.num_moe_layers
  with pytest.raises(ValueError, match="needs calibration_inputs .* has none"):
    swapmoe_jax.load(bare, experts=3, planner="calibrated", **SHAPE)
  prompts = _prompts(bare)
  path = loader.calibrate_checkpoint(bare, prompts, note="test")
  assert path == os.path.join(bare, ckpt.CALIBRATION_FILE) and ckpt.is_complete(bare)
  stored = ckpt.read_calibration(bare, cfg)
  measured = swapmoe_jax.load(bare, experts=3, planner="calibrated", calibration_inputs=prompts, **SHAPE)
  default = swapmoe_jax.load(bare, experts=3, **SHAPE)
  assert default.plan.method == measured.plan.method == "calibrated"
  assert default.plan.slots_per_layer == measured.plan.slots_per_layer != (3,) * cfg.num_moe_layers
  assert sum(default.plan.slots_per_layer) == 3 * cfg.num_moe_layers  # the same bytes, spread by importance
  dbytes = np.dtype(loader.DTYPES[ckpt.read_metadata(bare).dtype]).itemsize
  want = planner_lib.plan_calibrated(cfg, default.plan.budget_bytes, dbytes, **loader.request_shape(cfg, 1, 32, 16),
                                     importance=stored)
  assert default.plan.slots_per_layer == want.slots_per_layer
  for a, b in zip(default.residency.controller.state.slot_expert, measured.residency.controller.state.slot_expert):
    assert sorted(np.asarray(a).tolist()) == sorted(np.asarray(b).tolist())
  assert swapmoe_jax.load(bare, experts=3, planner="uniform", **SHAPE).plan.slots_per_layer == (3,) * cfg.num_moe_layers
  ids = prompts[0]
  np.testing.assert_array_equal(default.generate(ids, max_new_tokens=8), measured.generate(ids, max_new_tokens=8))


def test_a_damaged_calibration_names_its_file(bare, tmp_path):
  folder = str(tmp_path / "model")
  shutil.copytree(bare, folder)
  path = os.path.join(folder, ckpt.CALIBRATION_FILE)
  cfg = ckpt.read_metadata(folder).config
  for text in ("{not json", '{"importance": [[1, 2]]}', '{"importance": null}'):
    with open(path, "w") as f:
      f.write(text)
    with pytest.raises(ckpt.CheckpointError, match=f"damaged {path}"):
      ckpt.read_calibration(folder, cfg)
  with pytest.raises(ValueError, match="non-negative and of shape"):
    ckpt.write_calibration(folder, -np.ones((cfg.num_moe_layers, cfg.num_experts)), prompts=1)


def test_the_built_in_calibration_is_reproducible():
  """The shipped calibration.json is what `calibrate` measures on its 64 training-draw prompts
  (`python -m swapmoe_jax.builtin.calibrate`), so nobody hand-tuned it to the evaluation."""
  folder = default_checkpoint()
  meta = ckpt.read_metadata(folder)
  shipped = ckpt.read_calibration(folder, meta.config)
  assert shipped is not None
  tok = swapmoe_jax.load(folder, **SHAPE).tokenizer
  store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms,
                                            loader.DTYPES[meta.dtype], pinned=True, banks=True)
  again = loader.calibrate(meta.config, ckpt.restore_dense(meta), store, calibration_prompts(tok),
                           dtype=loader.DTYPES[meta.dtype])
  # rtol 1e-6, not bit-exact: on another machine the same code and checkpoint give float32 sums that differ
  # by up to 1.6e-7 (an AMD EPYC with jax 0.10.2, session 37; every layer's ranking unchanged), as XLA's
  # CPU code is built for the processor; a hand-tuned calibration would differ by far more.
  np.testing.assert_allclose(again, shipped, rtol=1e-6, atol=0)


@pytest.mark.parametrize("policy", ["swapmoe", "pruned"])
def test_the_built_in_allocations_are_where_the_recorded_search_stopped(policy):
  """The shipped allocations for `swapmoe` and for `pruned` (`python -m swapmoe_jax.builtin.calibrate`)
  are what each policy's recorded trace says its search reached: it started from the better of the
  coverage plan and the equal split, and no allocation one move from the result scored more than the
  result plus the search's minimum gain; `load(experts=K, policy=...)` plans them."""
  from swapmoe_jax.builtin import calibrate as builtin_calibrate

  assert policy in builtin_calibrate.SEARCH_POLICIES
  folder = default_checkpoint()
  cfg = ckpt.read_metadata(folder).config
  stored = ckpt.read_allocations(folder, cfg, policy)
  with open(os.path.join(folder, ckpt.CALIBRATION_FILE)) as f:
    data = json.load(f)
  trace = data["allocation_traces"][policy]
  assert "python -m swapmoe_jax.builtin.calibrate" in data["allocation_notes"][policy]
  assert trace["requests"] == builtin_calibrate.SEARCH_REQUESTS
  assert sorted(stored) == [4 * k for k in builtin_calibrate.SEARCH_EXPERTS]
  for k in builtin_calibrate.SEARCH_EXPERTS:
    best = stored[4 * k]
    scores = {tuple(t["slots"]): t["score"] for t in trace["by_experts"][str(k)]}
    starts = [tuple(t["slots"]) for t in trace["by_experts"][str(k)] if t["round"] == 0]
    assert (k,) * 4 in starts and len(starts) <= 2
    moves = [tuple(x + (i == dst) - (i == src) for i, x in enumerate(best))
             for src in range(4) for dst in range(4) if src != dst and best[src] > 1]
    assert best in scores and all(m in scores for m in moves)
    assert all(scores[m] <= scores[best] + trace["min_gain"] for m in moves)
    assert scores[best] >= max(scores[s] for s in starts)
    assert swapmoe_jax.load(folder, experts=k, policy=policy, **SHAPE).plan.slots_per_layer == best


def test_load_plans_k_per_layer_as_given_with_residents_by_the_stored_calibration(monkeypatch):
  """`planner=(K_1, ..., K_L)`: the plan holds those slots; the first residents are the top-K_l by the
  stored calibration; more slots than the budget holds are refused before the weights are read."""
  folder = default_checkpoint()
  cfg = ckpt.read_metadata(folder).config
  stored = ckpt.read_calibration(folder, cfg)
  slots = (6, 6, 4, 4)
  model = swapmoe_jax.load(folder, experts=5, planner=slots, **SHAPE)
  assert model.plan.slots_per_layer == slots and model.plan.method == "explicit"
  for layer, (resident, k) in enumerate(zip(model.residency.controller.state.slot_expert, slots)):
    assert sorted(np.asarray(resident).tolist()) == sorted(np.argsort(-stored[layer], kind="stable")[:k].tolist())
  def unread(*args, **kwargs):
    raise AssertionError("the experts were read")

  monkeypatch.setattr(ckpt, "restore_all_experts", unread)
  with pytest.raises(planner_lib.BudgetError, match="do not fit"):
    swapmoe_jax.load(folder, experts=5, planner=(8, 8, 4, 4), **SHAPE)
  with pytest.raises(ValueError, match="K per MoE layer"):
    swapmoe_jax.load(folder, experts=5, planner=[6.5, 6, 4, 4], **SHAPE)


def test_search_allocations_stores_what_load_then_plans_from(bare, tmp_path):
  """`search_allocations` scores the stored plan and the equal split (a candidate's score: requests
  answered as `full` answers them, as recomputed here) and climbs from the better (`local_search`,
  tested on its own in test_budget_planner; no round here, each candidate compiles), stores the result
  with its trace, and `load` then plans from it; a new calibration drops it."""
  from swapmoe_jax.serving import allocation

  folder = str(tmp_path / "model")
  shutil.copytree(bare, folder)
  if os.path.exists(os.path.join(folder, ckpt.CALIBRATION_FILE)):
    os.remove(os.path.join(folder, ckpt.CALIBRATION_FILE))
  prompts = _prompts(folder)
  with pytest.raises(ckpt.CheckpointError, match="no stored calibration"):
    allocation.search_allocations(folder, prompts, [3])
  with pytest.raises(ValueError, match="not 'lfu'"):
    allocation.search_allocations(folder, prompts, [3], policy="lfu")
  with pytest.raises(ValueError, match=r"\[S\] or \[1, S\]; got shapes \[\(2, 3\)\]"):
    allocation.padded([np.ones((2, 3), np.int32)], 0)
  loader.calibrate_checkpoint(folder, prompts, note="test")
  cfg = ckpt.read_metadata(folder).config
  coverage = swapmoe_jax.load(folder, experts=3, **SHAPE).plan.slots_per_layer
  lines = []
  result = allocation.search_allocations(folder, prompts, [3], rounds=0, max_new_tokens=8, progress=lines.append)
  (total, best), = result["allocations"].items()
  trace = result["trace"][3]
  assert total == sum(best) == 12 and len(lines) == len(trace) + 1
  scored = {tuple(t["slots"]): t["score"] for t in trace}
  assert set(scored) == {coverage, (3,) * 4} and scored[best] == max(scored.values())
  assert best == coverage or scored[best] > scored[coverage]
  ids, masks, width = allocation.padded(prompts, cfg.pad_token_id)
  shape = dict(max_batch_size=1, max_source_len=width, max_new_tokens=8)
  want = allocation.answers(swapmoe_jax.load(folder, **shape), ids, masks, 8)
  got = allocation.answers(swapmoe_jax.load(folder, experts=3, planner=(3,) * 4, **shape), ids, masks, 8)
  assert scored[(3,) * 4] == pytest.approx(allocation.agreement(got, want))
  assert allocation.agreement(want, want) == len(prompts) + 1
  assert ckpt.read_allocations(folder, cfg, "swapmoe") == {12: best}
  assert ckpt.read_allocations(folder, cfg, "pruned") == {}
  model = swapmoe_jax.load(folder, experts=3, **SHAPE)
  assert model.plan.slots_per_layer == best and "searched allocation" in model.plan.reason
  loader.calibrate_checkpoint(folder, prompts, note="again")
  assert ckpt.read_allocations(folder, cfg, "swapmoe") == {}


def test_damaged_allocations_name_the_file(bare, tmp_path):
  folder = str(tmp_path / "model")
  shutil.copytree(default_checkpoint(), folder)
  cfg = ckpt.read_metadata(folder).config
  path = os.path.join(folder, ckpt.CALIBRATION_FILE)
  with pytest.raises(ValueError, match="allocation for 20 slots must be 4 K_l"):
    ckpt.write_allocations(folder, "swapmoe", {20: [5, 5, 5]})
  ckpt.write_allocations(folder, "swapmoe", {20: [6, 2, 7, 5]}, note="by hand")
  assert ckpt.read_allocations(folder, cfg, "swapmoe") == {20: (6, 2, 7, 5)}
  assert ckpt.read_calibration(folder, cfg) is not None  # the importance is kept
  with open(path) as f:
    data = json.load(f)
  for bad in ({"swapmoe": {"20": [6, 2, 7, 6]}}, {"swapmoe": {"20": [6, 2, 7]}}, {"swapmoe": {"x": [1]}}, ["no"]):
    with open(path, "w") as f:
      json.dump(dict(data, allocations=bad), f)
    with pytest.raises(ckpt.CheckpointError, match=f"damaged {path}: allocation"):
      ckpt.read_allocations(folder, cfg, "swapmoe")
  with pytest.raises(ckpt.CheckpointError, match=f"damaged {path}: allocation"):
    swapmoe_jax.load(folder, experts=5, **SHAPE)
  os.remove(path)
  with pytest.raises(ckpt.CheckpointError, match="no stored calibration"):
    ckpt.write_allocations(folder, "swapmoe", {20: [5, 5, 5, 5]})
