"""SwapMoE core: masked gating, slot buffers, swaps without recompiles, budgets, and the policies."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.moe import VirtualExpertMoE
from swapmoe_jax.moe import router as router_lib
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import decode, loader
from swapmoe_jax.serving.executor import SwapExecutor
from swapmoe_jax.serving.swap import SlotWrite

E = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from checkpoints_conv import convert
  from hf_fixtures import make_hf_model, save_hf, tiny_config

  root = tmp_path_factory.mktemp("policies")
  cfg = tiny_config(num_experts=E, num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                    num_sparse_decoder_layers=2)
  hf = make_hf_model(cfg, seed=3, router_std=2.0)
  return convert(save_hf(hf, root / "hf"), root / "ours", progress=False)


@pytest.fixture(scope="module")
def parts(folder):
  meta = ckpt.read_metadata(folder)
  dense = ckpt.restore_dense(meta)
  store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, np.float32)
  return meta.config, dense, store


SHAPE = dict(max_batch_size=2, max_source_len=16, max_new_tokens=16)


def budget_for(folder, expert_fraction, **shape):
  """Bytes of a budget that holds the dense weights, caches, staging and workspace for `shape`, plus
  `expert_fraction` of all experts: percentages of a tiny model would go to workspace."""
  meta = ckpt.read_metadata(folder)
  cfg = meta.config
  shape = SHAPE | shape
  kw = dict(batch=shape["max_batch_size"], src_len=shape["max_source_len"],
            tgt_len=decode.cache_length(shape["max_new_tokens"]))
  one = budget_lib.expert_bytes_each(cfg, 4)
  base = budget_lib.memory_breakdown(cfg, 4, [1] * cfg.num_moe_layers, staging_slots=2, **kw).total
  base -= cfg.num_moe_layers * one
  return int(base + expert_fraction * cfg.num_moe_layers * E * budget_lib.expert_bytes_each(cfg, 4))


def _ids(seed, batch=2, src=9):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 96, (batch, src))
  ids[-1, src - 3:] = 0
  return ids, (ids != 0)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def _jit_call(module, *args):
  """Calls an NNX module through jax.jit (one compile instead of many eager ops)."""
  import jax

  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


# --- the masked MoE layer against a numpy reference -------------------------------------------
def _numpy_moe(x, w, wi_all, wo_all, resident, gate_mode, capacity):
  logits = x @ w
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  masked = np.where(np.isin(np.arange(p.shape[-1]), resident), p, -1.0)
  chosen = masked.argmax(-1)
  gate = np.take_along_axis(p, chosen[..., None], -1)[..., 0]
  if gate_mode == "renormalized":
    gate = gate / p[..., resident].sum(-1)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    count = np.zeros(p.shape[-1], int)
    for t in range(x.shape[1]):
      e = chosen[b, t]
      count[e] += 1
      if count[e] <= capacity:
        y[b, t] = gate[b, t] * (np.maximum(x[b, t] @ wi_all[e], 0) @ wo_all[e])
  return y, chosen


@pytest.mark.parametrize("gate_mode", router_lib.GATE_MODES)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("tokens", [3, 24])  # gather and grouped dispatch
def test_masked_moe_equals_numpy_reference(gate_mode, seed, tokens):
  rng = np.random.default_rng(seed)
  d, f, k = 8, 12, int(rng.integers(1, E))
  resident = np.sort(rng.choice(E, k, replace=False))
  moe = VirtualExpertMoE(d, f, E, k, capacity=5, gate_mode=gate_mode, rngs=nnx.Rngs(seed))
  wi_all = rng.standard_normal((E, d, f)).astype(np.float32)
  wo_all = rng.standard_normal((E, f, d)).astype(np.float32)
  perm = rng.permutation(k)  # slot order is arbitrary
  moe.wi[...] = wi_all[resident[perm]].transpose(0, 2, 1)  # slots are [out, in]
  moe.wo[...] = wo_all[resident[perm]].transpose(0, 2, 1)
  slot_of = np.full(E, -1, np.int32)
  slot_of[resident[perm]] = np.arange(k)
  moe.slot_of[...] = slot_of
  x = rng.standard_normal((2, tokens // 2 if tokens > 3 else 1, d)).astype(np.float32)
  y, stats, routing = _jit_call(moe, x)
  y_ref, chosen_ref = _numpy_moe(x, np.asarray(moe.router_w[...]), wi_all, wo_all, resident, gate_mode, 5)
  np.testing.assert_array_equal(np.asarray(routing.chosen), chosen_ref)
  assert _rel(y, y_ref) < 1e-5
  assert set(np.asarray(routing.chosen).ravel()) <= set(resident.tolist())
  # statistics: wanted counts follow the unmasked router; redirected = chosen != wanted
  wanted = np.asarray(routing.wanted)
  np.testing.assert_array_equal(np.asarray(stats.wanted), np.bincount(wanted.ravel(), minlength=E))
  assert int(stats.redirected) == int((wanted != chosen_ref).sum())
  assert int(stats.misses) == int((~np.isin(wanted, resident)).sum())


def test_importance_is_paper_eq1():
  rng = np.random.default_rng(0)
  moe = VirtualExpertMoE(8, 12, E, 3, capacity=64, rngs=nnx.Rngs(0))
  norms = rng.uniform(0.5, 2.0, E).astype(np.float32)
  moe.norms[...] = norms
  x = rng.standard_normal((2, 5, 8)).astype(np.float32)
  _, stats, routing = _jit_call(moe, x)
  logits = x @ np.asarray(moe.router_w[...])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = p.argmax(-1)
  ref = np.zeros(E)
  for b in range(2):
    for t in range(5):
      e = want[b, t]
      ref[e] += np.linalg.norm(x[b, t]) * p[b, t, e] * norms[e]
  np.testing.assert_allclose(np.asarray(stats.importance), ref, rtol=1e-5)


# --- slots, swaps, recompiles -------------------------------------------------------------------
def _logits(cfg, graphdef, params, slots, banks=None, seed=0):
  ids, mask = _ids(seed)
  dec = np.zeros((ids.shape[0], 4), np.int32)
  dec[:, 1:] = np.arange(3, 6)
  logits, _, _ = decode.forward(graphdef, params, slots, ids, mask, dec, None, banks)
  return np.asarray(logits)


def test_k_equals_e_with_any_slot_order_equals_full(parts):
  cfg, dense, store = parts
  full = _logits(cfg, *loader.build_model(cfg, dense, store))
  rng = np.random.default_rng(0)
  perm = [rng.permutation(E) for _ in cfg.moe_layers]
  permuted = _logits(cfg, *loader.build_model(cfg, dense, store, resident=perm))
  np.testing.assert_allclose(permuted, full, rtol=0, atol=1e-6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_swap_schedules_equal_a_fresh_model(parts, data):
  cfg, dense, store = parts
  k = [3, 5, 1, 7][: cfg.num_moe_layers]  # fixed shapes: one compile; the schedules are random
  start = [np.arange(kk) for kk in k]
  graphdef, params, slots = loader.build_model(cfg, dense, store, slots_per_layer=k, resident=start)
  resident = [list(s) for s in start]
  ex = SwapExecutor(store, cfg.moe_layers, k, max_writes=2)
  for _ in range(data.draw(st.integers(1, 6))):
    writes = []
    for _ in range(data.draw(st.integers(1, 2))):
      layer = data.draw(st.integers(0, cfg.num_moe_layers - 1))
      absent = [e for e in range(E) if e not in resident[layer]]
      if not absent or any(w.layer == layer for w in writes):
        continue
      slot = data.draw(st.integers(0, k[layer] - 1))
      expert = data.draw(st.sampled_from(absent))
      writes.append(SlotWrite(layer, slot, expert, resident[layer][slot]))
      resident[layer][slot] = expert
    maps = [loader_index_map(r) for r in resident]
    slots = ex.commit(slots, ex.stage(writes), writes, maps)
  fresh = loader.build_model(cfg, dense, store, slots_per_layer=k, resident=[np.asarray(r) for r in resident])
  np.testing.assert_array_equal(_logits(cfg, graphdef, params, slots), _logits(cfg, *fresh))


def loader_index_map(resident):
  m = np.full(E, -1, np.int32)
  m[np.asarray(resident)] = np.arange(len(resident))
  return m


_BACKEND_COMPILES = []


def _listener(name, _duration, **_):
  if name == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(name)


import jax  # noqa: E402

jax.monitoring.register_event_duration_secs_listener(_listener)


def _compiles():
  """XLA backend compilations so far in this process (every jitted program, ours and JAX's)."""
  return len(_BACKEND_COMPILES)


@pytest.mark.parametrize("layout", ["rows", "banks"])
def test_24_swaps_between_decode_steps_never_recompile(folder, parts, layout):
  """Drives the executor directly: decode step, swap, decode step, ... with the compile counter, from
  the first step on: the executor's warm-up compiled every staging and commit program."""
  import jax.numpy as jnp

  cfg, dense, store = parts
  if layout == "banks":  # a store of its own: building the banks changes the shared one's layout
    meta = ckpt.read_metadata(folder)
    store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, np.float32)
    store.banks()
  assert store.layout == layout
  k = [3, 5, 1, 7][: cfg.num_moe_layers]
  graphdef, params, slots = loader.build_model(cfg, dense, store, slots_per_layer=k,
                                               resident=[np.arange(kk) for kk in k])
  ex = SwapExecutor(store, cfg.moe_layers, k, max_writes=2)
  resident = [list(range(kk)) for kk in k]
  slots = ex.warm_up(slots, [np.asarray(r) for r in resident], [loader_index_map(r) for r in resident])
  ids, mask = _ids(0)
  cache, _ = decode.encode(graphdef, params, slots, ids, mask, 64, None)
  tokens, done = jnp.zeros((2,), jnp.int32), jnp.zeros((2,), bool)
  rng = np.random.default_rng(0)
  swaps, before = 0, None
  acc = decode.zero_stats(len(cfg.decoder_sparse_layers), E)
  for step in range(14):
    tokens, done, cache, _, acc = decode.decode_step(graphdef, params, slots, tokens, done, cache, jnp.int32(step),
                                                  jax_key(), None, acc, swapmoe_jax.Sampling(), 0, (1,))
    if step == 0:
      continue  # the step's second call takes committed inputs (its own outputs): compiled once more
    if step == 1:
      before = _compiles()  # no swap yet: staging and commits were compiled by the warm-up alone
    writes = []
    for layer in rng.choice(cfg.num_moe_layers, 2, replace=False):
      slot = int(rng.integers(k[layer]))
      expert = int(rng.choice([e for e in range(E) if e not in resident[layer]]))
      writes.append(SlotWrite(int(layer), slot, expert, resident[layer][slot]))
      resident[layer][slot] = expert
    slots, _ = ex.apply(slots, writes, [loader_index_map(r) for r in resident])  # as the residency swaps
    swaps += len(writes)
  assert swaps >= 24
  assert _compiles() == before


def jax_key():
  import jax

  return jax.random.key(0)


def test_a_request_compiles_the_decode_step_once(folder):
  """Every input of the step is committed to the device like its outputs, so the second and later and
  window-closing calls share one program (uncommitted inputs once gave three compiles per model); the
  first call, of one step (the first token early), is the only other one."""
  model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy="swapmoe", update_every=4, **SHAPE)
  before = decode.decode_steps._cache_size()
  ids, mask = _ids(3)
  model.generate(ids, mask, max_new_tokens=12, steps_per_call=4)
  assert decode.decode_steps._cache_size() - before == 2
  model.generate(ids, mask, max_new_tokens=12, steps_per_call=4)
  assert decode.decode_steps._cache_size() - before == 2


@pytest.mark.parametrize("policy", ["swapmoe", "lru"])
def test_policies_swap_through_generate_without_recompiling(folder, policy):
  model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy=policy, update_every=1,
                           max_swaps_per_step=2, **SHAPE)
  ids, mask = _ids(1)
  model.generate(ids, mask, max_new_tokens=16)  # warm-up: every program compiled once
  before = _compiles()
  swapped_before = model.stats.summary()["experts_swapped"]
  for seed in range(2, 6):
    ids, mask = _ids(seed)
    model.generate(ids, mask, max_new_tokens=8)
  assert model.stats.summary()["experts_swapped"] > swapped_before
  assert _compiles() == before


def test_every_staging_swaps_the_same_experts_and_tokens_without_recompiling(folder):
  """"transfer" (device_put from pinned rows), "gather" (a jitted read of pinned banks) and "pageable"
  (device_put from numpy banks) serve the same tokens through the same swaps; after the first request
  none compiles again. The default, "auto", is "pageable" on the CPU and "gather" where the platform
  is a GPU (faked here through `resolve_staging`'s `platform`)."""
  models = {s: swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy="swapmoe", update_every=1,
                                max_swaps_per_step=2, staging=s, **SHAPE) for s in ("transfer", "gather", "pageable")}
  layouts = {s: (m.store.layout, m.store.memory_kind) for s, m in models.items()}
  assert layouts == {"transfer": ("rows", "pinned_host"), "gather": ("banks", "pinned_host"),
                     "pageable": ("banks", None)}
  default = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy="swapmoe", **SHAPE)
  assert (default.store.layout, default.store.memory_kind) == layouts["pageable"], "auto is pageable on the CPU"
  real = loader.resolve_staging
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loader, "resolve_staging",
               lambda staging, cfg, b, **kw: real(staging, cfg, b, **(kw | {"platform": "gpu"})))
    on_gpu = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy="swapmoe", update_every=1,
                              max_swaps_per_step=2, **SHAPE)
  assert (on_gpu.store.layout, on_gpu.store.memory_kind) == layouts["gather"], "auto gathers on a GPU"
  models["auto on a GPU"] = on_gpu
  for s, model in models.items():
    model.generate(*_ids(1), max_new_tokens=16)
  before = _compiles()
  for seed in range(2, 6):
    ids, mask = _ids(seed)
    want = models["transfer"].generate(ids, mask, max_new_tokens=8)
    for s in ("gather", "pageable", "auto on a GPU"):
      np.testing.assert_array_equal(models[s].generate(ids, mask, max_new_tokens=8), want)
  assert _compiles() == before
  swapped = {s: m.stats.summary()["experts_swapped"] for s, m in models.items()}
  assert swapped["gather"] == swapped["transfer"] == swapped["pageable"] == swapped["auto on a GPU"] > 0
  with pytest.raises(ValueError, match="unknown staging 'dma'; supported: auto, transfer, gather, pageable"):
    swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), staging="dma", **SHAPE)


# --- exact policies ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_exact_policies_generate_exactly_the_full_tokens(folder, policy):
  full = swapmoe_jax.load(folder)
  exact = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy=policy, **SHAPE)
  assert min(exact.plan.slots_per_layer) < E, "the budget must force misses"
  for seed in range(4):
    ids, mask = _ids(seed + 10)
    np.testing.assert_array_equal(exact.generate(ids, mask, max_new_tokens=12),
                                  full.generate(ids, mask, max_new_tokens=12))
  s = exact.stats.summary()
  assert s["misses"] > 0 and s["experts_swapped"] > 0


@pytest.mark.parametrize("policy", ["full", "lfu"])
def test_steps_per_call_does_not_change_the_tokens(folder, policy):
  """Several decode steps per device call (a scan in one program) give the tokens of one call per step,
  including where rows stop at EOS; lfu swaps between calls, so it also covers swaps landing mid-request."""
  budget = None if policy == "full" else budget_for(folder, 0.45)
  model = swapmoe_jax.load(folder, budget=budget, policy=policy, **SHAPE)
  for seed in range(3):
    ids, mask = _ids(seed + 20)
    per_step = model.generate(ids, mask, max_new_tokens=13, steps_per_call=1)
    for chunk in (4, 8, 16):
      streamed = []
      out = model.generate(ids, mask, max_new_tokens=13, steps_per_call=chunk,
                           stream=lambda step, tok: streamed.append((step, tok.tolist())))
      np.testing.assert_array_equal(out, per_step)
      steps = [s for s, _ in streamed]
      assert steps == list(range(len(steps))) and len(steps) >= out.shape[1]
      np.testing.assert_array_equal(np.array([t for _, t in streamed[:out.shape[1]]]).T, out)


@pytest.mark.parametrize("bad", [0, 3, 128, 2.0, True])
def test_bad_steps_per_call_is_refused(folder, bad):
  model = swapmoe_jax.load(folder)
  ids, mask = _ids(0)
  with pytest.raises(swapmoe_jax.InputError, match="steps_per_call"):
    model.generate(ids, mask, max_new_tokens=4, steps_per_call=bad)


def test_swapmoe_and_pruned_serve_only_resident_experts(folder):
  for policy in ("swapmoe", "pruned"):
    model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.45), policy=policy, **SHAPE)
    ids, mask = _ids(5)
    out = model.generate(ids, mask, max_new_tokens=10)
    assert out.shape[0] == 2
    s = model.stats.summary()
    assert s["tokens_routed"] > 0
    assert s["redirected"] > 0, f"{policy}: a 45% budget should redirect some tokens"
    if policy == "pruned":
      assert s["experts_swapped"] == 0


# --- budgets ----------------------------------------------------------------------------------
def test_too_small_budget_states_the_minimum(folder):
  with pytest.raises(budget_lib.BudgetError, match="minimum"):
    swapmoe_jax.load(folder, budget="1KiB", policy="swapmoe")


def test_planned_bytes_never_exceed_the_budget(folder):
  for frac in (0.3, 0.45, 0.6, 0.8):
    b = budget_for(folder, frac)
    model = swapmoe_jax.load(folder, budget=b, policy="swapmoe", **SHAPE)
    assert model.plan.breakdown.total <= b
    assert sum(model.plan.slots_per_layer) < E * model.config.num_moe_layers
    # the device really holds what the plan says: slot buffers of K_l experts
    pure = nnx.to_pure_dict(model.slots)
    for (stack, i), k in zip(model.config.moe_layers, model.plan.slots_per_layer):
      assert pure[stack]["blocks"][i]["moe"]["wi"].shape[0] == k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accounted_weight_bytes_equal_the_device_arrays(folder, dtype):
  import jax

  model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.5), policy="swapmoe", dtype=dtype, **SHAPE)
  held = sum(a.nbytes for a in jax.tree.leaves(model.params)) + sum(a.nbytes for a in jax.tree.leaves(model.slots))
  b = model.plan.breakdown
  assert held == b.dense_bytes + b.expert_bytes


def test_request_beyond_the_planned_shape_is_refused(folder):
  model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.6, max_batch_size=1), policy="swapmoe",
                           **(SHAPE | dict(max_batch_size=1)))
  ids, mask = _ids(0, batch=2)
  with pytest.raises(swapmoe_jax.InputError, match="planned"):
    model.generate(ids, mask, max_new_tokens=4)


def test_calibrated_planner_through_load(folder):
  calib = [_ids(s)[0] for s in range(3)]
  model = swapmoe_jax.load(folder, budget=budget_for(folder, 0.5), policy="swapmoe", planner="calibrated",
                           calibration_inputs=calib, **SHAPE)
  assert model.plan.method == "calibrated"
  assert model.plan.breakdown.total <= model.plan.budget_bytes
  ids, mask = _ids(9)
  assert model.generate(ids, mask, max_new_tokens=5).shape[0] == 2


def test_telemetry_counts_the_experts_read_from_host_memory():
  """`missed_experts`: distinct non-resident experts per layer call; in bytes only where misses are read
  from host memory (exact and selective routing), none under masked routing, int8 copies under fallback."""
  from swapmoe_jax.builtin.demo import default_checkpoint

  limits = dict(max_batch_size=1, max_source_len=32, max_new_tokens=16)
  summaries = {}
  for policy in ("lfu", "swapmoe", "fallback"):
    model = swapmoe_jax.load(default_checkpoint(), experts=2, policy=policy, **limits)
    ids = model.tokenizer("sort: 7 3 9 1 4", return_tensors="np").input_ids
    model.generate(ids, max_new_tokens=8)
    summaries[policy] = (model.stats.summary(), model.store.expert_bytes)
  s, expert_bytes = summaries["lfu"]
  # At most one read per token served from host, at least one per layer call that had a miss.
  assert 0 < s["missed_experts"] <= s["from_bank"]
  assert s["bytes_from_host"] == s["missed_experts"] * expert_bytes
  s, _ = summaries["swapmoe"]
  assert s["missed_experts"] == s["from_bank"] == s["bytes_from_host"] == 0 and s["redirected"] > 0
  s, _ = summaries["fallback"]
  assert s["missed_experts"] > 0 and s["bytes_from_host"] == 0


def test_routing_statistics_are_read_exactly_in_one_transfer():
  """`residency.routing_stats` packs device LayerStats into one float32 vector (int32 counts bitcast):
  counts above float32's exact range (2^24) and negative values survive, and the result equals a
  leaf-by-leaf read."""
  import jax.numpy as jnp

  from swapmoe_jax.models.switch.config import SwitchConfig
  from swapmoe_jax.moe.router import LayerStats
  from swapmoe_jax.serving import residency

  cfg = SwitchConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=2, num_decoder_layers=2,
                     num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1)
  assert cfg.num_moe_layers == 4
  rng = np.random.default_rng(0)

  def stats(n):
    return LayerStats(importance=jnp.asarray(rng.random((n, 4)), jnp.float32),
                      wanted=jnp.asarray(rng.integers(2**24, 2**31 - 1, (n, 4)), jnp.int32),
                      served=jnp.asarray(rng.integers(0, 9, (n, 4)), jnp.int32),
                      redirected=jnp.asarray([-3, 2**30][:n], jnp.int32), misses=jnp.zeros((n,), jnp.int32),
                      from_bank=jnp.asarray(rng.integers(0, 2**31 - 1, n), jnp.int32),
                      missed_experts=jnp.asarray(rng.integers(0, 5, n), jnp.int32))

  enc, dec = stats(2), stats(2)
  got = residency.routing_stats(cfg, enc, dec)
  host = [jax.device_get(enc), jax.device_get(dec)]
  np.testing.assert_array_equal(got.importance, np.concatenate([h.importance for h in host]))
  for name in ("wanted", "served", "redirected", "from_bank"):
    np.testing.assert_array_equal(getattr(got, name), np.concatenate([getattr(h, name) for h in host]))
  np.testing.assert_array_equal(got.missed_experts, np.concatenate([h.missed_experts for h in host]))
  only_dec = residency.routing_stats(cfg, None, dec)
  np.testing.assert_array_equal(only_dec.wanted[2:], host[1].wanted)
  assert not only_dec.wanted[:2].any()
