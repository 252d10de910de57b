"""Fallback routing (issue 16 item 4b; HOBBIT, arXiv 2411.01433): every expert also kept on the device as
an int8 copy; a token whose expert is not resident is computed with that copy instead of being
redirected.

Checked: the quantizer against a numpy twin written here; the layer against a numpy reference (top-1
with HF's capacity rule, top-k GLU without capacity) where some tokens are served from the int8 copies,
statistics included; with every expert resident, the masked layer's output exactly; swaps never
recompile (layer and served model); the budget counts the copies (the breakdown's `fallback_bytes`
equal the copies' bytes, fallback holds at most swapmoe's K at any budget, a budget below the minimum
raises BudgetError); policy "fallback" end to end on the built-in model (agrees with `full` at least as
often as `pruned` does, never redirects) and on the command line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.moe import FallbackExperts, VirtualExpertMoE
from swapmoe_jax.moe import quant
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import loader
from swapmoe_jax.serving import planner as planner_lib

# The numpy helpers and the jitted layer call of the selective tests (same shapes, same references).
from test_selective import D, F, _rel, _run, _silu, _softmax  # noqa: E402


# --- the quantizer -----------------------------------------------------------------------------------


def _twin_quantize(w):
  """Symmetric per-output-row int8, row by row in float64: scale = max|w| / 127, q = round(w / scale)."""
  w = np.asarray(w, np.float64)
  flat = w.reshape(-1, w.shape[-1])
  q = np.zeros(flat.shape, np.int64)
  scale = np.zeros(flat.shape[0])
  for i, row in enumerate(flat):
    scale[i] = np.abs(row).max() / 127
    if scale[i] > 0:
      q[i] = np.clip(np.rint(row / scale[i]), -127, 127)
  return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def _dequantized(w):
  q, scale = _twin_quantize(w)
  return q * scale[..., None]


def test_quantizer_matches_its_numpy_twin():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 5, 7)).astype(np.float32)
  w[1, 2] = 0  # a row of zeros: scale 0, q 0
  w[2, 0, 3] = 40.0  # an outlier: its row's other entries round to small integers
  q, scale = quant.quantize_int8(w)
  q_ref, scale_ref = _twin_quantize(w)
  assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == w.shape and scale.shape == (3, 5)
  np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
  # Rounding of w / scale in float32 against float64 may differ only at a tie: nowhere here.
  np.testing.assert_array_equal(q, q_ref)
  assert np.abs(q).max() == 127 and scale[1, 2] == 0 and not q[1, 2].any()
  err = np.abs(quant.dequantize_int8(q, scale) - w)
  assert np.all(err <= scale[..., None] / 2 * (1 + 1e-5))
  import ml_dtypes

  qb, sb = quant.quantize_int8(w.astype(ml_dtypes.bfloat16))  # any float dtype: through float32
  np.testing.assert_array_equal(qb, _twin_quantize(w.astype(ml_dtypes.bfloat16).astype(np.float32))[0])
  assert sb.dtype == np.float32


# --- top-1 with capacity (Switch) ------------------------------------------------------------------


def _ref_top1(x, router_w, wi, wo, resident, capacity):
  """Fallback top-1 in float64, token by token: the wanted expert always serves, in full precision when
  resident, from its dequantized int8 copy otherwise; HF's capacity per batch row in position order,
  counted for the wanted expert either way. Returns y and the counts."""
  x = np.asarray(x, np.float64)
  p = _softmax(x @ router_w)
  wi_low, wo_low = _dequantized(wi), _dequantized(wo)
  e = p.shape[-1]
  y = np.zeros_like(x)
  counts = dict(from_bank=0, misses=0, served=np.zeros(e, int))
  for b in range(x.shape[0]):
    taken = np.zeros(e, int)
    for t in range(x.shape[1]):
      c = int(p[b, t].argmax())
      counts["misses"] += int(not resident[c])
      counts["from_bank"] += int(not resident[c])
      taken[c] += 1
      if taken[c] <= capacity:
        counts["served"][c] += 1
        a, o = (wi[c], wo[c]) if resident[c] else (wi_low[c], wo_low[c])
        y[b, t] = p[b, t, c] * (o @ np.maximum(a @ x[b, t], 0))
  return y, counts


def _switch_layer(seed, resident, routing="fallback", capacity=3, e=8):
  rng = np.random.default_rng(seed)
  wi = (rng.standard_normal((e, F, D)) / np.sqrt(D)).astype(np.float32)
  wo = (rng.standard_normal((e, D, F)) / np.sqrt(F)).astype(np.float32)
  layer = VirtualExpertMoE(D, F, e, len(resident), capacity, routing=routing, rngs=nnx.Rngs(seed))
  layer.router_w[...] = jnp.asarray(rng.standard_normal((D, e)).astype(np.float32))
  layer.place_experts(resident, wi, wo)
  return layer, (wi, wo)


@pytest.mark.parametrize("b, t", [(1, 6), (2, 12)])  # the gather and the grouped (scan) paths
def test_top1_serves_misses_from_int8_copies_like_the_reference(b, t):
  resident = [6, 1, 3]
  layer, (wi, wo) = _switch_layer(0, resident)
  res = np.isin(np.arange(8), resident)
  x = np.random.default_rng(1).standard_normal((b, t, D)).astype(np.float32)
  y, stats, routing = _run(layer, x)
  y_ref, counts = _ref_top1(x, np.asarray(layer.router_w[...]), wi, wo, res, 3)
  assert counts["from_bank"] > 0, "the case must have misses"
  assert _rel(y, y_ref) < 1e-5
  np.testing.assert_array_equal(routing.chosen, routing.wanted)  # nothing is redirected
  assert int(stats.redirected) == 0
  assert int(stats.from_bank) == int(stats.misses) == counts["from_bank"]
  np.testing.assert_array_equal(np.asarray(stats.served), counts["served"])
  if b * t > 12:
    assert counts["served"].sum() < b * t, "capacity 3 must drop some of 24 tokens"
  # The int8 copies change the output: served in full precision (exact routing) it is another.
  exact, _ = _switch_layer(0, resident, "exact")
  y_exact = _run(exact, x, None, (jnp.asarray(wi), jnp.asarray(wo)))[0]
  assert 1e-4 < _rel(y, y_exact) < 0.05


def test_top1_int8_copies_take_their_experts_capacity():
  """A token served from an int8 copy counts towards its wanted expert's capacity, as under exact
  routing: with one resident expert and capacity 1, the second token wanting the same missing expert
  is dropped."""
  layer, (wi, wo) = _switch_layer(2, [0], capacity=1, e=4)
  x = np.random.default_rng(3).standard_normal((1, 16, D)).astype(np.float32)
  wanted = _softmax(x @ np.asarray(layer.router_w[...])).argmax(-1)[0]
  y, stats, routing = _run(layer, x)
  y_ref, counts = _ref_top1(x, np.asarray(layer.router_w[...]), wi, wo, np.arange(4) == 0, 1)
  assert _rel(y, y_ref) < 1e-5
  dropped = np.asarray(~routing.keep)[0]
  assert dropped.sum() == 16 - len(set(wanted.tolist())) > 0
  np.testing.assert_array_equal(np.asarray(y)[0][dropped], 0)
  assert int(stats.from_bank) == counts["from_bank"] == int((wanted != 0).sum())


# --- top-k GLU without capacity (decoder families) -------------------------------------------------


def _ref_topk(x, router_w, wi, wo, resident, k, norm):
  """Fallback top-k with GLU (SiLU) experts in float64: every token-choice pair served by its wanted
  expert, from its dequantized int8 copy when not resident. Returns y and the count of such pairs."""
  x = np.asarray(x, np.float64)
  p = _softmax(x @ router_w)
  wi_low, wo_low = _dequantized(wi), _dequantized(wo)
  y = np.zeros_like(x)
  low = 0
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      chosen = np.argsort(-p[b, t], kind="stable")[:k]
      g = p[b, t, chosen]
      if norm:
        g = g / g.sum()
      for e, ge in zip(chosen, g):
        a, o = (wi[e], wo[e]) if resident[e] else (wi_low[e], wo_low[e])
        h = a @ x[b, t]
        y[b, t] += ge * (o @ (_silu(h[:F]) * h[F:]))
        low += int(not resident[e])
  return y, low


def _topk_layer(seed, resident, routing="fallback", *, e=6, k=2, norm=False):
  rng = np.random.default_rng(seed)
  wi = (rng.standard_normal((e, 2 * F, D)) / np.sqrt(D)).astype(np.float32)
  wo = (rng.standard_normal((e, D, F)) / np.sqrt(F)).astype(np.float32)
  layer = VirtualExpertMoE(D, F, e, len(resident), None, act="silu", top_k=k, expert_kind="glu", routing=routing,
                           norm_topk_prob=norm, rngs=nnx.Rngs(seed))
  layer.router_w[...] = jnp.asarray(rng.standard_normal((D, e)).astype(np.float32))
  layer.place_experts(resident, wi, wo)
  return layer, (wi, wo)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("b, t", [(1, 4), (2, 12)])  # pairs on both sides of experts.GATHER_MAX_TOKENS
def test_topk_glu_serves_each_missing_pair_from_int8_copies_like_the_reference(norm, b, t):
  resident = [4, 0]
  layer, (wi, wo) = _topk_layer(5, resident, norm=norm)
  res = np.isin(np.arange(6), resident)
  x = np.random.default_rng(6).standard_normal((b, t, D)).astype(np.float32)
  y, stats, routing = _run(layer, x)
  y_ref, low = _ref_topk(x, np.asarray(layer.router_w[...]), wi, wo, res, 2, norm)
  assert low > 0
  assert _rel(y, y_ref) < 1e-5
  np.testing.assert_array_equal(routing.chosen, routing.wanted)
  assert np.asarray(routing.keep).all()
  assert int(stats.redirected) == 0 and int(stats.from_bank) == int(stats.misses) == low


# --- every expert resident: the masked layer --------------------------------------------------------


@pytest.mark.parametrize("kind", ["top1", "topk"])
@pytest.mark.parametrize("t", [4, 12])
def test_all_resident_fallback_is_the_masked_layer_exactly(kind, t):
  make = _switch_layer if kind == "top1" else _topk_layer
  e = 8 if kind == "top1" else 6
  x = np.random.default_rng(10).standard_normal((2, t, D)).astype(np.float32)
  out = {r: _run(make(9, list(range(e))[::-1], r)[0], x) for r in ("fallback", "masked")}
  np.testing.assert_array_equal(out["fallback"][0], out["masked"][0])
  for name in ("importance", "wanted", "served", "redirected", "misses", "from_bank"):
    np.testing.assert_array_equal(getattr(out["fallback"][1], name), getattr(out["masked"][1], name))
  assert int(out["fallback"][1].from_bank) == 0


def test_copies_are_state_and_swaps_do_not_recompile_the_layer():
  layer, (wi, wo) = _topk_layer(11, [0, 1, 2])
  graphdef, state = nnx.split(layer)
  copies = nnx.state(layer, FallbackExperts)
  shapes = {k: (v.shape, v.dtype) for k, v in nnx.to_flat_state(copies)}
  assert shapes == {("wi_q",): ((6, 2 * F, D), jnp.int8), ("wi_scale",): ((6, 2 * F), jnp.float32),
                    ("wo_q",): ((6, D, F), jnp.int8), ("wo_scale",): ((6, D), jnp.float32)}

  @jax.jit
  def step(state, x):
    return nnx.merge(graphdef, state)(x)[1].from_bank

  x = np.random.default_rng(12).standard_normal((2, 12, D)).astype(np.float32)
  seen = [int(step(nnx.state(layer), x))]
  layer.put_expert(1, 4, wi[4], wo[4])
  seen.append(int(step(nnx.state(layer), x)))
  layer.set_fallback(wi * 2, wo)  # new copies: values only
  seen.append(int(step(nnx.state(layer), x)))
  assert step._cache_size() == 1
  assert seen[0] > 0 and seen[0] != seen[1]
  with pytest.raises(ValueError, match="routing 'fallback'"):
    _topk_layer(0, [0, 1], "masked")[0].set_fallback(wi, wo)


# --- budget ------------------------------------------------------------------------------------------

SHAPE = dict(max_batch_size=2, max_source_len=16, max_new_tokens=12)


@pytest.fixture(scope="module")
def builtin():
  return swapmoe_jax.default_checkpoint()


def test_budget_counts_the_int8_copies():
  from swapmoe_jax.models.decoder.config import DecoderConfig
  from swapmoe_jax.models.switch.config import SwitchConfig

  cases = [SwitchConfig(num_experts=8, num_layers=2, num_decoder_layers=2, d_model=32, d_ff=48),
           DecoderConfig(model_type="qwen2_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, num_experts=6, top_k=2, moe_d_ff=24, sparse_layers=(0, 1))]
  for cfg in cases:
    e, d = cfg.num_experts, cfg.d_model
    rows = cfg.d_ff if cfg.is_encoder_decoder else 2 * cfg.moe_d_ff
    f = cfg.d_ff if cfg.is_encoder_decoder else cfg.moe_d_ff
    want = cfg.num_moe_layers * e * ((rows * d + d * f) + 4 * (rows + d))
    assert budget_lib.fallback_bytes(cfg) == want
    args = (cfg, 2, [2] * cfg.num_moe_layers, 1, 16, 64, 2)
    with_copies, without = budget_lib.memory_breakdown(*args, fallback=True), budget_lib.memory_breakdown(*args)
    assert with_copies.fallback_bytes == want and without.fallback_bytes == 0
    arrays = lambda m: m.total - m.allocator_bytes  # noqa: E731
    assert arrays(with_copies) - arrays(without) == want
    assert "int8 fallback copies" in str(with_copies) and "fallback" not in str(without)
    # At any budget fallback holds at most swapmoe's K, strictly fewer somewhere; below its minimum
    # (which is swapmoe's plus the copies) it raises BudgetError with that minimum.
    shape = dict(batch=1, src_len=16, tgt_len=64)
    low = budget_lib.min_budget_bytes(cfg, 2, **shape, staging_slots=2)
    low_fb = budget_lib.min_budget_bytes(cfg, 2, **shape, staging_slots=2, fallback=True)
    assert low_fb > low
    fewer = False
    for budget in np.linspace(low_fb, budget_lib.full_model_bytes(cfg, 2) * 3 + low_fb, 25).astype(int):
      fb = planner_lib.plan_uniform(cfg, int(budget), 2, **shape, fallback=True)
      sw = planner_lib.plan_uniform(cfg, int(budget), 2, **shape)
      assert all(a <= b for a, b in zip(fb.slots_per_layer, sw.slots_per_layer))
      assert fb.breakdown.total <= budget and fb.breakdown.fallback_bytes == want
      fewer |= fb.resident_experts < sw.resident_experts
    assert fewer
    with pytest.raises(budget_lib.BudgetError, match=f"below the minimum .*{low_fb} bytes"):
      planner_lib.plan_uniform(cfg, low_fb - 1, 2, **shape, fallback=True)
    planner_lib.plan_uniform(cfg, low_fb - 1, 2, **shape)  # swapmoe runs there
    k = 3
    fb_bytes = budget_lib.budget_for_experts(cfg, 2, k, **shape, staging_slots=2, fallback=True)
    assert planner_lib.plan_uniform(cfg, fb_bytes, 2, **shape, fallback=True).slots_per_layer == (k,) * len(args[2])


def test_loaded_copies_are_what_the_budget_counts(builtin):
  model = swapmoe_jax.load(builtin, experts=3, policy="fallback", planner="uniform", **SHAPE)  # 3 in every layer
  cfg = model.config
  from swapmoe_jax.serving.decode import unflat

  leaves = [v for path, v in jax.tree_util.tree_leaves_with_path(unflat(model._params))  # noqa: SLF001
            if any(getattr(p, "key", None) in ("wi_q", "wi_scale", "wo_q", "wo_scale") for p in path)]
  assert len(leaves) == 4 * cfg.num_moe_layers
  assert sum(v.nbytes for v in leaves) == model.plan.breakdown.fallback_bytes == budget_lib.fallback_bytes(cfg)
  assert model.plan.slots_per_layer == (3,) * cfg.num_moe_layers
  assert model.plan.budget_bytes == loader.experts_budget(builtin, 3, policy="fallback", **SHAPE)
  assert loader.experts_budget(builtin, 3, policy="fallback", **SHAPE) > loader.experts_budget(builtin, 3, **SHAPE)
  # At fallback's bytes for K = 3, swapmoe holds more full-precision experts.
  swapmoe = swapmoe_jax.load(builtin, budget=model.plan.budget_bytes, policy="swapmoe", **SHAPE)
  assert min(swapmoe.plan.slots_per_layer) > 3
  assert not loader.needs_pinned("fallback", "pageable") and model._banks is None  # noqa: SLF001


# --- the policy, end to end --------------------------------------------------------------------------

_BACKEND_COMPILES = []


def _listener(name, _duration, **_):
  if name == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_listener)


def _task_batches(model, n, seed):
  """n task prompts of the built-in model's families, two per batch, padded to one length (one compiled
  program per model)."""
  from swapmoe_jax.builtin import tasks

  rows = [model.tokenizer(ex.prompt)["input_ids"][:SHAPE["max_source_len"]] for ex in tasks.make_examples(n, seed=seed)]
  ids = np.zeros((n, SHAPE["max_source_len"]), np.int32)
  mask = np.zeros(ids.shape, bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, True
  return [(ids[i:i + 2], mask[i:i + 2]) for i in range(0, n, 2)]


def test_builtin_fallback_agrees_with_full_at_least_as_often_as_pruned(builtin):
  models = {p: swapmoe_jax.load(builtin, **({} if p == "full" else dict(experts=3, policy=p)), **SHAPE)
            for p in ("full", "fallback", "pruned")}
  agree = {"fallback": 0, "pruned": 0}
  tokens = {"fallback": 0, "pruned": 0}
  for ids, mask in _task_batches(models["full"], 12, seed=4):
    ref = models["full"].generate(ids, mask, max_new_tokens=12)
    for p in agree:
      out = models[p].generate(ids, mask, max_new_tokens=12)
      n = min(out.shape[1], ref.shape[1])
      same = np.all(out[:, :n] == ref[:, :n], axis=1) & (out.shape[1] == ref.shape[1])
      agree[p] += int(same.sum())
      tokens[p] += int((out[:, :n] == ref[:, :n]).sum())
  assert agree["fallback"] >= agree["pruned"] and tokens["fallback"] >= tokens["pruned"], (agree, tokens)
  assert agree["fallback"] >= 8, agree
  s = models["fallback"].stats.summary()
  assert s["policy"] == "fallback" and s["redirected"] == 0 and s["from_bank"] > 0 and s["misses"] > 0
  assert models["pruned"].stats.summary()["redirected"] > 0


def test_builtin_swaps_never_recompile(builtin):
  vocab = ckpt.read_metadata(builtin).config.vocab_size
  model = swapmoe_jax.load(builtin, experts=3, policy="fallback", update_every=1, max_swaps_per_step=2, **SHAPE)
  rng = np.random.default_rng(20)

  def prompts():
    ids = rng.integers(3, vocab, (2, 12))
    mask = np.ones(ids.shape, bool)
    mask[1, 9:] = False
    return ids, mask

  model.generate(*prompts(), max_new_tokens=12)  # warm-up: every program compiled once
  before, swapped = len(_BACKEND_COMPILES), model.stats.summary()["experts_swapped"]
  for _ in range(4):
    model.generate(*prompts(), max_new_tokens=12)
  assert len(_BACKEND_COMPILES) == before, "a swap recompiled"
  assert model.stats.summary()["experts_swapped"] > swapped
  assert model.stats.totals["redirected"] == 0 and model.stats.totals["from_bank"] > 0


def test_fallback_on_a_mesh_of_one_device_equals_one_device(builtin):
  """`devices=1`: the copies go through the expert-parallel path (split on E over a one-device mesh,
  misses under `shard_map`), with the same tokens as without a mesh. `multidevice_cases.py` runs 8."""
  ids = np.asarray([[5, 9, 14, 3, 8, 1]], np.int32)
  one = swapmoe_jax.load(builtin, experts=2, policy="fallback", **SHAPE)
  mesh = swapmoe_jax.load(builtin, experts=2, policy="fallback", devices=1, **SHAPE)
  assert mesh.plan.breakdown == one.plan.breakdown
  np.testing.assert_array_equal(mesh.generate(ids, max_new_tokens=8), one.generate(ids, max_new_tokens=8))
  assert mesh.stats.totals["from_bank"] == one.stats.totals["from_bank"] > 0


def test_fallback_arguments_are_checked(builtin):
  with pytest.raises(ValueError, match="unknown policy"):
    loader.experts_budget(builtin, 3, policy="sometimes")
  assert loader.routing_of("fallback") == "fallback" and not loader.reads_bank("fallback")


def test_cli_policy_fallback(builtin, capsys):
  from swapmoe_jax import generate

  rc = generate.main(["--policy", "fallback", "--experts", "3", "--prompt", "reverse: a b c", "--max-new-tokens",
                      "8", "--max-source-len", "16", "--json"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  result = json.loads(out)
  assert result["stats"]["policy"] == "fallback" and result["stats"]["redirect_rate"] == 0
  assert sum(result["stats"]["slots_per_layer"]) == 3 * 4  # spread over the layers by the stored calibration


# --- int4 copies ---------------------------------------------------------------------------------------


def _twin_quantize_int4(w):
  """Symmetric per-output-row int4 in float64: scale = max|w| / 7, q = round(w / scale) in [-7, 7]."""
  w = np.asarray(w, np.float64)
  scale = np.abs(w).max(-1) / 7
  safe = np.where(scale > 0, scale, 1)[..., None]
  return np.clip(np.rint(w / safe), -7, 7).astype(np.int64), scale


def test_int4_packs_two_values_per_byte_and_unpacks_them_on_the_device():
  rng = np.random.default_rng(4)
  w = rng.standard_normal((2, 3, 10)).astype(np.float32)
  w[0, 1] = 0
  q, scale = quant.quantize(w, 4)
  q_ref, scale_ref = _twin_quantize_int4(w)
  assert q.dtype == np.int8 and q.shape == (2, 3, 5) and quant.is_packed(q, 10)
  np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
  # Bytes by hand: column 2j in the low nibble, 2j+1 in the high one (two's complement nibbles).
  nib = (q_ref % 16).astype(np.uint8)
  np.testing.assert_array_equal(q.view(np.uint8), nib[..., 0::2] | (nib[..., 1::2] << 4))
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(q))), q_ref)
  assert np.all(np.abs(quant.dequantize(q, scale, 4) - w) <= scale[..., None] / 2 * (1 + 1e-5))
  every = np.arange(-8, 8, dtype=np.int8)  # every nibble round-trips
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(quant.pack_int4(every))), every)
  with pytest.raises(ValueError, match="even"):
    quant.quantize(np.ones((2, 3)), 4)
  with pytest.raises(ValueError, match="bits must be"):
    quant.quantize(w, 2)


@pytest.mark.parametrize("b, t", [(1, 6), (2, 12)])  # the gather and the grouped (scan) paths
def test_top1_serves_misses_from_int4_copies_like_the_reference(b, t):
  resident = [6, 1, 3]
  layer, (wi, wo) = _switch_layer(0, resident)
  layer.set_fallback(wi, wo, bits=4)
  assert layer.wi_q.shape == (8, F, D // 2) and layer.wo_q.shape == (8, D, F // 2)
  res = np.isin(np.arange(8), resident)
  x = np.random.default_rng(1).standard_normal((b, t, D)).astype(np.float32)
  y, stats, _ = _run(layer, x)
  # The reference: misses through the int4-dequantized weights, in float64.
  p = _softmax(np.asarray(x, np.float64) @ np.asarray(layer.router_w[...], np.float64))
  (qi, si), (qo, so) = _twin_quantize_int4(wi), _twin_quantize_int4(wo)
  wi_low, wo_low = qi * si[..., None], qo * so[..., None]
  y_ref = np.zeros(x.shape)
  for bb in range(b):
    taken = np.zeros(8, int)
    for tt in range(t):
      c = int(p[bb, tt].argmax())
      taken[c] += 1
      if taken[c] <= 3:
        a, o = (wi[c], wo[c]) if res[c] else (wi_low[c], wo_low[c])
        y_ref[bb, tt] = p[bb, tt, c] * (o @ np.maximum(a @ x[bb, tt], 0))
  assert int(stats.from_bank) > 0
  assert _rel(y, y_ref) < 1e-5
  y8 = _run(_switch_layer(0, resident)[0], x)[0]  # int8 copies: another, closer output
  assert _rel(y, y8) > 1e-4


def test_int4_copies_hold_half_the_bytes_and_serve_the_builtin(builtin):
  cfg = ckpt.read_metadata(builtin).config
  rows, d, f = cfg.d_ff, cfg.d_model, cfg.d_ff
  want = cfg.num_moe_layers * cfg.num_experts * ((rows * d + d * f) // 2 + 4 * (rows + d))
  assert budget_lib.fallback_bytes(cfg, 4) == want
  model = swapmoe_jax.load(builtin, experts=3, policy="fallback", fallback_bits=4, **SHAPE)
  from swapmoe_jax.serving.decode import unflat

  leaves = [v for path, v in jax.tree_util.tree_leaves_with_path(unflat(model._params))  # noqa: SLF001
            if any(getattr(p, "key", None) in ("wi_q", "wi_scale", "wo_q", "wo_scale") for p in path)]
  assert sum(v.nbytes for v in leaves) == model.plan.breakdown.fallback_bytes == want
  assert "int4 fallback copies" in str(model.plan.breakdown)
  assert model.plan.budget_bytes == loader.experts_budget(builtin, 3, policy="fallback", fallback_bits=4, **SHAPE)
  assert (loader.experts_budget(builtin, 3, **SHAPE) < model.plan.budget_bytes
          < loader.experts_budget(builtin, 3, policy="fallback", **SHAPE))
  full = swapmoe_jax.load(builtin, **SHAPE)
  (ids, mask), = _task_batches(full, 2, seed=11)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=10), full.generate(ids, mask, max_new_tokens=10))
  assert model.stats.summary()["from_bank"] > 0
  for bad in (2, 16, True):
    with pytest.raises(ValueError, match="fallback_bits must be 4 or 8"):
      swapmoe_jax.load(builtin, experts=3, policy="fallback", fallback_bits=bad, **SHAPE)
  with pytest.raises(ValueError, match="applies to policy 'fallback'"):
    swapmoe_jax.load(builtin, experts=3, policy="swapmoe", fallback_bits=4, **SHAPE)
