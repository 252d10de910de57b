"""Expert parallelism on 8 simulated CPU devices: every policy against the one-device model.

Not collected on its own: `test_multidevice.py` runs this file with pytest in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so that the rest of the suite keeps one device.
A persistent compilation cache shares programs between models whose programs are the same (e.g. lru
and lfu); the compile counter counts its hits too, so a recompile is seen either way.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.moe import parallel
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import decode, loader, sharding

E, K = 32, 8  # experts per layer; slots per layer under the budgets below (one per device on 8)
SHAPE = dict(max_batch_size=2, max_source_len=16, max_new_tokens=16)
SWAPPING = ("swapmoe", "lru", "lfu", "fallback")

_PROGRAMS = []


def _count(name, *_, **__):
  if name in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"):
    _PROGRAMS.append(name)


jax.monitoring.register_event_duration_secs_listener(_count)
jax.monitoring.register_event_listener(_count)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  from jax.experimental.compilation_cache import compilation_cache as cc

  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  cc.reset_cache()
  yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from checkpoints_conv import convert
  from hf_fixtures import make_hf_model, save_hf, tiny_config

  assert len(jax.devices()) == 8, "run through test_multidevice.py (8 simulated devices)"
  root = tmp_path_factory.mktemp("multidevice")
  cfg = tiny_config(num_experts=E, num_layers=1, num_decoder_layers=1, num_sparse_encoder_layers=1,
                    num_sparse_decoder_layers=1)
  return convert(save_hf(make_hf_model(cfg, seed=5, router_std=2.0), root / "hf"), root / "ours", progress=False)


def per_device_budget(folder, devices, fallback=False, bank_reads=False):
  """Bytes per device that hold K slots per layer (K / devices on each device) and nothing more (with
  `fallback`, plus each device's share of the int8 copies; with `bank_reads`, plus the experts exact
  routing copies from host memory in a step)."""
  cfg = ckpt.read_metadata(folder).config
  reads = budget_lib.bank_read_experts(cfg, 4, SHAPE["max_batch_size"]) if bank_reads else 0
  return budget_lib.memory_breakdown(cfg, 4, [K] * cfg.num_moe_layers, SHAPE["max_batch_size"],
                                     SHAPE["max_source_len"], decode.cache_length(SHAPE["max_new_tokens"]),
                                     staging_slots=2, devices=devices or 1, fallback=fallback,
                                     bank_reads=reads).total


def _load(folder, policy, devices):
  if policy == "full":
    return swapmoe_jax.load(folder, devices=devices)
  budget = per_device_budget(folder, devices, policy == "fallback", bank_reads=policy in ("lru", "lfu"))
  return swapmoe_jax.load(folder, budget=budget, policy=policy,
                          update_every=1,
                          max_swaps_per_step=2, devices=devices, **SHAPE)


def _ids(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 96, (2, 9))
  ids[-1, 6:] = 0
  return ids, ids != 0


def _summary(model):
  s = model.stats.summary()
  return {k: v for k, v in s.items() if not k.endswith("_s") and k != "transfer_gb_per_s"}


@pytest.mark.parametrize("policy,devices", [(p, 8) for p in ("full", "swapmoe", "pruned", "lru", "lfu", "fallback")]
                         + [("lru", 2)])
def test_sharded_model_equals_one_device(folder, policy, devices):
  one, many = _load(folder, policy, None), _load(folder, policy, devices)
  assert many.plan.slots_per_layer == one.plan.slots_per_layer
  assert many.plan.slots_per_layer == ((E,) if policy == "full" else (K,)) * 2
  ids, mask = _ids(0)
  steps = decode.decode_steps._cache_size()
  out = many.generate(ids, mask, max_new_tokens=12)
  # two programs: the one-step first call (the first token early) and the 16-step calls
  assert decode.decode_steps._cache_size() == steps + 2, "caches and step inputs keep their shardings"
  np.testing.assert_array_equal(out, one.generate(ids, mask, max_new_tokens=12))
  # Logits of the first decoder position (teacher-forcing more positions compiles 2x longer on the CPU).
  np.testing.assert_allclose(many(ids, mask), one(ids, mask), rtol=0, atol=1e-5)
  programs = len(_PROGRAMS)  # every program of both models has run once
  swapped = many.stats.summary()["experts_swapped"] if many.stats else 0
  for seed in (1, 2, 3):
    ids, mask = _ids(seed)
    np.testing.assert_array_equal(many.generate(ids, mask, max_new_tokens=12),
                                  one.generate(ids, mask, max_new_tokens=12))
  assert len(_PROGRAMS) == programs, "a request after the first compiled a program"
  if policy != "full":  # the same routing, hits, misses and swaps, step by step
    assert _summary(many) == _summary(one)
  if policy in SWAPPING:
    assert many.stats.summary()["experts_swapped"] > swapped, "the requests should have swapped experts"
  if policy in ("lru", "lfu", "fallback"):
    assert many.stats.summary()["misses"] > 0, "the budget should force misses (read from host memory, or " \
                                               "computed from the int8 copies)"


def test_each_device_holds_its_share_of_the_plan(folder):
  model = _load(folder, "lru", 8)
  cfg, plan = model.config, model.plan
  assert plan.devices == 8
  one_expert = budget_lib.expert_bytes_each(cfg, 4)
  per_device = {d: 0 for d in jax.devices()}
  for leaf in jax.tree.leaves(model.params) + jax.tree.leaves(model.slots):
    for d, n in sharding.shard_bytes(leaf).items():
      per_device[d] += n
  assert set(per_device.values()) == {plan.breakdown.dense_bytes + plan.breakdown.expert_bytes}
  assert plan.breakdown.expert_bytes == sum(plan.slots_per_layer) // 8 * one_expert
  assert plan.breakdown.total <= plan.budget_bytes
  pure = nnx.to_pure_dict(model.slots)
  for stack, i in cfg.moe_layers:
    moe = pure[stack]["blocks"][i]["moe"]
    assert moe["wi"].sharding.spec == PartitionSpec("expert")
    assert set(sharding.shard_bytes(moe["wi"]).values()) == {K // 8 * cfg.d_model * cfg.d_ff * 4}
    assert moe["slot_of"].sharding.is_fully_replicated
  # exact routing reads misses from host memory, split by expert over the devices
  for wi, wo in model._banks:
    assert wi.sharding.memory_kind == "pinned_host" and wi.sharding.spec == PartitionSpec("expert")
    assert {s.data.shape[0] for s in wi.addressable_shards} == {E // 8}


def test_fallback_copies_are_split_over_the_devices(folder):
  """Policy "fallback" on 8 devices: each device holds the int8 copies of E / 8 experts per layer (as it
  holds that part of the host bank), and exactly its share of the plan, copies included."""
  model = _load(folder, "fallback", 8)
  cfg, plan = model.config, model.plan
  assert plan.breakdown.fallback_bytes == budget_lib.fallback_bytes(cfg) // 8 > 0
  per_device = {d: 0 for d in jax.devices()}
  for leaf in jax.tree.leaves(model.params) + jax.tree.leaves(model.slots):
    for d, n in sharding.shard_bytes(leaf).items():
      per_device[d] += n
  assert set(per_device.values()) == {plan.breakdown.dense_bytes + plan.breakdown.expert_bytes
                                      + plan.breakdown.fallback_bytes}
  assert plan.breakdown.total <= plan.budget_bytes
  pure = nnx.to_pure_dict(model.params)
  for stack, i in cfg.moe_layers:
    moe = pure[stack]["blocks"][i]["moe"]
    for name in sharding.FALLBACK_COPIES:
      assert moe[name].sharding.spec == PartitionSpec("expert")
      assert {s.data.shape[0] for s in moe[name].addressable_shards} == {E // 8}


def test_calibrated_planner_on_eight_devices(folder):
  """Calibration runs exact routing with one slot per layer on each device, then plans per device."""
  model = swapmoe_jax.load(folder, budget=per_device_budget(folder, 8), policy="swapmoe", planner="calibrated",
                           calibration_inputs=[_ids(s)[0] for s in range(2)], devices=8, **SHAPE)
  assert model.plan.method == "calibrated" and model.plan.devices == 8
  assert all(k % 8 == 0 for k in model.plan.slots_per_layer)
  assert model.plan.breakdown.total <= model.plan.budget_bytes
  ids, mask = _ids(4)
  assert model.generate(ids, mask, max_new_tokens=5).shape[0] == 2


def test_slots_that_do_not_split_over_the_devices_are_refused(folder):
  meta = ckpt.read_metadata(folder)
  mesh = sharding.expert_mesh(8)
  store = sharding.ShardedExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, np.float32, mesh)
  with pytest.raises(ValueError, match="MoE layer 0: 12 slots do not split evenly over 8 devices"):
    loader.build_model(meta.config, ckpt.restore_dense(meta), store, slots_per_layer=[12, 8], mesh=mesh)


@pytest.mark.parametrize("devices,message", [
    (3, "the 32 experts of each MoE layer do not split evenly over 3 devices"),
    (9, "devices=9, but 8 cpu device"),
    (Mesh(np.array(jax.devices()[:2]), ("data",)), "single axis 'expert'"),
    ([jax.devices()[0]] * 2, "lists a device twice"),
])
def test_bad_devices_are_refused(folder, devices, message):
  with pytest.raises(ValueError, match=message):
    swapmoe_jax.load(folder, budget="90%", policy="swapmoe", devices=devices, **SHAPE)


def test_too_small_per_device_budget_states_the_minimum(folder):
  with pytest.raises(budget_lib.BudgetError, match="below the minimum .* per device \\(8 devices"):
    swapmoe_jax.load(folder, budget=per_device_budget(folder, 8) - 1, policy="swapmoe", devices=8,
                     **SHAPE)


@pytest.mark.parametrize("tokens", [2, 40])  # the decode (gather) and prefill (dispatch) paths
def test_expert_parallel_ffn_moves_activations_not_experts(tokens):
  """Each device computes its own slots' tokens; the compiled program all-reduces [N, D] outputs and
  never gathers slot buffers or host banks (GSPMD alone all-gathered the whole buffer for decode)."""
  from jax.sharding import NamedSharding

  from swapmoe_jax.moe import experts as experts_lib

  mesh = parallel.expert_mesh(8)
  rng = np.random.default_rng(tokens)
  d, f = 8, 12
  x = rng.standard_normal((tokens, d)).astype(np.float32)
  slot = rng.integers(0, K * 2, tokens).astype(np.int32)
  keep = rng.random(tokens) < 0.8
  # [out, in] per expert, the slots' orientation: wi [K, F, D], wo [K, D, F]
  wi, wo = rng.standard_normal((K * 2, f, d)).astype(np.float32), rng.standard_normal((K * 2, d, f)).astype(np.float32)
  split = NamedSharding(mesh, PartitionSpec("expert"))
  host = NamedSharding(mesh, PartitionSpec("expert"), memory_kind="pinned_host")
  ffn, misses = parallel.expert_parallel(mesh)
  run = jax.jit(lambda x, s, k, wi, wo, bi, bo: (ffn(x, s, wi, wo, jax.nn.relu, keep=k, capacity=tokens),
                                                 misses(x, s, k, bi, bo, jax.nn.relu)))
  args = (x, slot, keep, jax.device_put(wi, split), jax.device_put(wo, split), jax.device_put(wi, host),
          jax.device_put(wo, host))
  y, y_miss = run(*args)
  ref = experts_lib.expert_ffn(x, slot, wi, wo, jax.nn.relu, keep=keep, capacity=tokens)
  # tokens not kept are zeroed by the caller (MoE layer), whichever path
  np.testing.assert_allclose(np.where(keep[:, None], y, 0), np.where(keep[:, None], ref, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_miss, experts_lib.expert_ffn_misses(x, slot, keep, wi, wo, jax.nn.relu),
                             rtol=1e-5, atol=1e-5)
  hlo = run.lower(*args).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" in hlo
