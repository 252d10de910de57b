"""Selective routing (issue 16): a miss whose router probability is >= the threshold is served exactly from
the host bank, the others are redirected as masked routing redirects them.

Checked: the layer against a numpy reference written here (top-1 with HF's capacity rule, top-k
without capacity, both with some tokens served from the bank and some redirected, statistics
included); threshold 0 gives exact routing's outputs and a threshold above 1 masked routing's; policy
"selective" end to end on the built-in Switch model (threshold 0: `full`'s tokens; threshold 2:
`swapmoe`'s tokens and swaps) and on a tiny HF decoder model; neither swaps nor a new threshold
recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.moe import VirtualExpertMoE
from swapmoe_jax.serving import loader

D, F = 8, 12


def _softmax(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _silu(h):
  return h / (1 + np.exp(-h))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _run(layer, x, mask=None, bank=None):
  graphdef, state = nnx.split(layer)
  return jax.jit(lambda s, x, m, b: nnx.merge(graphdef, s)(x, m, b))(state, x, mask, bank)


def _midpoint_threshold(values):
  """A threshold halfway between the two middle distinct values: some above, some below, none near it
  (float32 against float64 cannot flip a decision)."""
  v = np.unique(np.round(values, 6))
  assert v.size >= 2, "the case needs misses on both sides of the threshold"
  i = v.size // 2
  return float((v[i - 1] + v[i]) / 2)


# --- top-1 with capacity (Switch) ------------------------------------------------------------------


def _ref_top1(x, router_w, wi, wo, resident, threshold, gate_mode, capacity):
  """Selective top-1 in float64, token by token, HF's capacity per batch row in position order.
  x: [B, T, D]; wi: [E, F, D]; wo: [E, D, F]; resident: bool[E]. Returns y, chosen and the counts."""
  x = np.asarray(x, np.float64)
  p = _softmax(x @ router_w)
  e = p.shape[-1]
  y = np.zeros_like(x)
  chosen = np.zeros(x.shape[:2], int)
  counts = dict(redirected=0, from_bank=0, misses=0, served=np.zeros(e, int), missed=set())
  for b in range(x.shape[0]):
    taken = np.zeros(e, int)
    for t in range(x.shape[1]):
      pt = p[b, t]
      wanted = int(pt.argmax())
      available = resident | (pt >= threshold)
      if available[wanted]:
        c = wanted  # resident, or probable enough: read from the bank
      else:
        c = int(np.where(resident, pt, -1.0).argmax())  # masked routing: the best resident expert
      chosen[b, t] = c
      counts["misses"] += int(not resident[wanted])
      counts["redirected"] += int(c != wanted)
      counts["from_bank"] += int(not resident[c])
      if not resident[c]:
        counts["missed"].add(c)  # an expert read from the bank (once per call, whatever its tokens)
      gate = pt[c] / (pt[available].sum() if gate_mode == "renormalized" else 1.0)
      taken[c] += 1
      if taken[c] <= capacity:
        counts["served"][c] += 1
        y[b, t] = gate * (wo[c] @ np.maximum(wi[c] @ x[b, t], 0))
  return y, chosen, counts


def _switch_layer(seed, resident, routing, gate_mode="original", capacity=3, e=8, threshold=0.5):
  rng = np.random.default_rng(seed)
  wi = (rng.standard_normal((e, F, D)) / np.sqrt(D)).astype(np.float32)
  wo = (rng.standard_normal((e, D, F)) / np.sqrt(F)).astype(np.float32)
  layer = VirtualExpertMoE(D, F, e, len(resident), capacity, routing=routing, gate_mode=gate_mode,
                           selective_threshold=threshold, rngs=nnx.Rngs(seed))
  layer.router_w[...] = jnp.asarray(rng.standard_normal((D, e)).astype(np.float32))
  layer.place_experts(resident, wi, wo)
  return layer, (wi, wo)


@pytest.mark.parametrize("gate_mode", ["original", "renormalized"])
@pytest.mark.parametrize("b, t", [(1, 6), (2, 12)])  # the gather and the grouped dispatch paths
def test_top1_mixes_bank_reads_and_redirects_like_the_reference(gate_mode, b, t):
  resident = [6, 1, 3]
  layer, (wi, wo) = _switch_layer(0, resident, "selective", gate_mode)
  res = np.isin(np.arange(8), resident)
  x = np.random.default_rng(1).standard_normal((b, t, D)).astype(np.float32)
  p = _softmax(x.astype(np.float64) @ np.asarray(layer.router_w[...], np.float64))
  wanted = p.argmax(-1)
  threshold = _midpoint_threshold(p.max(-1)[~res[wanted]])
  layer.selective_threshold[...] = threshold
  y, stats, routing = _run(layer, x, None, (jnp.asarray(wi), jnp.asarray(wo)))
  y_ref, chosen_ref, counts = _ref_top1(x, np.asarray(layer.router_w[...]), wi, wo, res, threshold, gate_mode, 3)
  assert counts["from_bank"] > 0 and counts["redirected"] > 0, "the case must mix both kinds of miss"
  np.testing.assert_array_equal(np.asarray(routing.chosen), chosen_ref)
  np.testing.assert_array_equal(np.asarray(routing.wanted), wanted)
  assert _rel(y, y_ref) < 1e-5
  for name in ("redirected", "from_bank", "misses"):
    assert int(getattr(stats, name)) == counts[name], name
  assert int(stats.missed_experts) == len(counts["missed"]) > 0
  assert counts["misses"] == counts["redirected"] + counts["from_bank"]
  np.testing.assert_array_equal(np.asarray(stats.served), counts["served"])
  np.testing.assert_array_equal(np.asarray(stats.wanted), np.bincount(wanted.ravel(), minlength=8))
  if b * t > 12:
    assert (counts["served"].sum() < b * t), "capacity 3 must drop some of 24 tokens"


def test_top1_bank_reads_take_their_experts_capacity():
  """A token served from the bank counts towards its wanted expert's capacity, as under exact routing:
  with one resident expert and a capacity of 1, the second token that wants the same missing expert is
  dropped even though the expert is read from the bank."""
  layer, (wi, wo) = _switch_layer(2, [0], "selective", capacity=1, e=4, threshold=0.0)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, 16, D)).astype(np.float32)
  p = _softmax(x @ np.asarray(layer.router_w[...]))
  wanted = p.argmax(-1)[0]
  y, stats, routing = _run(layer, x, None, (jnp.asarray(wi), jnp.asarray(wo)))
  y_ref, _, counts = _ref_top1(x, np.asarray(layer.router_w[...]), wi, wo, np.arange(4) == 0, 0.0, "original", 1)
  assert _rel(y, y_ref) < 1e-5
  dropped = np.asarray(~routing.keep)[0]
  assert dropped.sum() == 16 - len(set(wanted.tolist())) > 0
  np.testing.assert_array_equal(np.asarray(y)[0][dropped], 0)
  assert int(stats.from_bank) == counts["from_bank"] == int((wanted != 0).sum())


# --- top-k without capacity (decoder families) -----------------------------------------------------


def _ref_topk(x, router_w, wi, wo, resident, threshold, k, gate_mode, norm):
  """Selective top-k with GLU (SiLU) experts in float64: each token-choice pair is served as wanted when
  its expert is resident or probable enough (>= threshold), else it gives way to the best resident
  expert the token does not use yet. Returns y, the served {expert: gate} per token and the counts."""
  x = np.asarray(x, np.float64)
  p = _softmax(x @ router_w)
  y = np.zeros_like(x)
  served, counts = {}, dict(redirected=0, from_bank=0, misses=0, missed=set())
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      pt = p[b, t]
      order = np.argsort(-pt, kind="stable")
      wanted = order[:k]
      available = resident | (pt >= threshold)
      chosen = [e for e in order if available[e]][:k]
      g = pt[chosen]
      if gate_mode == "renormalized":
        g = g / pt[available].sum()
      if norm:
        g = g / g.sum()
      for e, ge in zip(chosen, g):
        h = wi[e] @ x[b, t]
        y[b, t] += ge * (wo[e] @ (_silu(h[:F]) * h[F:]))
      served[b, t] = dict(zip(chosen, g.tolist()))
      counts["misses"] += int((~resident[wanted]).sum())
      counts["redirected"] += sum(e not in wanted for e in chosen)
      counts["from_bank"] += sum(not resident[e] for e in chosen)
      counts["missed"] |= {int(e) for e in chosen if not resident[e]}
  return y, served, counts


def _topk_layer(seed, resident, routing, *, e=6, k=2, gate_mode="original", norm=False, threshold=0.5):
  rng = np.random.default_rng(seed)
  wi = (rng.standard_normal((e, 2 * F, D)) / np.sqrt(D)).astype(np.float32)
  wo = (rng.standard_normal((e, D, F)) / np.sqrt(F)).astype(np.float32)
  layer = VirtualExpertMoE(D, F, e, len(resident), None, act="silu", top_k=k, expert_kind="glu", routing=routing,
                           gate_mode=gate_mode, norm_topk_prob=norm, selective_threshold=threshold,
                           rngs=nnx.Rngs(seed))
  layer.router_w[...] = jnp.asarray(rng.standard_normal((D, e)).astype(np.float32))
  layer.place_experts(resident, wi, wo)
  return layer, (wi, wo)


@pytest.mark.parametrize("gate_mode, norm", [("original", False), ("renormalized", False), ("original", True)])
@pytest.mark.parametrize("b, t", [(1, 4), (2, 12)])  # pairs on both sides of experts.GATHER_MAX_TOKENS
def test_topk_decides_each_pair_like_the_reference(gate_mode, norm, b, t):
  resident = [4, 0]
  layer, (wi, wo) = _topk_layer(5, resident, "selective", gate_mode=gate_mode, norm=norm)
  res = np.isin(np.arange(6), resident)
  x = np.random.default_rng(6).standard_normal((b, t, D)).astype(np.float32)
  p = _softmax(x.astype(np.float64) @ np.asarray(layer.router_w[...], np.float64))
  top = np.argsort(-p, axis=-1)[..., :2]
  missing_p = np.take_along_axis(p, top, -1)[~res[top]]
  threshold = _midpoint_threshold(missing_p)
  layer.selective_threshold[...] = threshold
  y, stats, routing = _run(layer, x, None, (jnp.asarray(wi), jnp.asarray(wo)))
  y_ref, served, counts = _ref_topk(x, np.asarray(layer.router_w[...]), wi, wo, res, threshold, 2, gate_mode, norm)
  assert counts["from_bank"] > 0 and counts["redirected"] > 0, "the case must mix both kinds of miss"
  # Some token has one pair read from the bank and another redirected: pairs are decided one by one.
  assert b * t < 8 or any(any(not res[e] for e in s) and any(e not in top[bt] for e in s) for bt, s in served.items())
  assert _rel(y, y_ref) < 1e-5
  chosen, gate, keep = (np.asarray(a) for a in (routing.chosen, routing.gate, routing.keep))
  for (bb, tt), pairs in served.items():
    got = {int(e): float(g) for e, g, kept in zip(chosen[bb, tt], gate[bb, tt], keep[bb, tt]) if kept}
    assert got.keys() == pairs.keys()
    np.testing.assert_allclose([got[e] for e in pairs], list(pairs.values()), rtol=1e-5)
  for name in ("redirected", "from_bank", "misses"):
    assert int(getattr(stats, name)) == counts[name], name
  assert int(stats.missed_experts) == len(counts["missed"]) > 0


def test_topk_with_fewer_available_experts_than_k_drops_the_rest():
  """One resident expert, k = 3, a threshold no miss reaches but the top one: a token is served by at
  most two experts and the third choice has gate 0, as masked routing does with K < k."""
  layer, (wi, wo) = _topk_layer(7, [2], "selective", k=3, norm=True)
  x = np.random.default_rng(8).standard_normal((2, 5, D)).astype(np.float32)
  p = _softmax(x.astype(np.float64) @ np.asarray(layer.router_w[...], np.float64))
  threshold = _midpoint_threshold(np.sort(p, -1)[..., -1].ravel())
  layer.selective_threshold[...] = threshold
  y, stats, routing = _run(layer, x, None, (jnp.asarray(wi), jnp.asarray(wo)))
  y_ref, served, counts = _ref_topk(x, np.asarray(layer.router_w[...]), wi, wo, np.arange(6) == 2, threshold, 3,
                                    "original", True)
  assert _rel(y, y_ref) < 1e-5
  assert not np.asarray(routing.keep).all()
  assert int(stats.from_bank) == counts["from_bank"] > 0


# --- the two ends: exact and masked routing ----------------------------------------------------------


def _both_ends(make, x):
  """Outputs and statistics of selective routing at thresholds 0 and 2, and of exact and masked routing,
  all with the same weights and residents."""
  out = {}
  for name, routing, threshold in [("t0", "selective", 0.0), ("t2", "selective", 2.0), ("exact", "exact", 0.5),
                                   ("masked", "masked", 0.5)]:
    layer, (wi, wo) = make(routing, threshold)
    bank = None if routing == "masked" else (jnp.asarray(wi), jnp.asarray(wo))
    out[name] = _run(layer, x, None, bank)
  return out


@pytest.mark.parametrize("gate_mode", ["original", "renormalized"])
@pytest.mark.parametrize("kind", ["top1", "topk"])
def test_threshold_0_is_exact_routing_and_2_is_masked_routing(kind, gate_mode):
  if kind == "top1":
    make = lambda routing, thr: _switch_layer(9, [5, 2, 7], routing, gate_mode, threshold=thr)  # noqa: E731
  else:
    make = lambda routing, thr: _topk_layer(9, [3, 1], routing, gate_mode=gate_mode, threshold=thr)  # noqa: E731
  x = np.random.default_rng(10).standard_normal((2, 12, D)).astype(np.float32)
  out = _both_ends(make, x)
  np.testing.assert_array_equal(out["t2"][0], out["masked"][0])
  if gate_mode == "original":
    np.testing.assert_array_equal(out["t0"][0], out["exact"][0])
  else:  # the gate is divided by the sum of all probabilities, 1 up to rounding
    np.testing.assert_allclose(out["t0"][0], out["exact"][0], rtol=1e-6, atol=1e-6)
  for field in ("chosen", "slot", "keep"):
    np.testing.assert_array_equal(getattr(out["t0"][2], field), getattr(out["exact"][2], field))
    np.testing.assert_array_equal(getattr(out["t2"][2], field), getattr(out["masked"][2], field))
  for name in ("importance", "wanted", "served", "redirected", "misses", "from_bank"):
    np.testing.assert_array_equal(getattr(out["t0"][1], name), getattr(out["exact"][1], name))
    np.testing.assert_array_equal(getattr(out["t2"][1], name), getattr(out["masked"][1], name))
  assert int(out["exact"][1].misses) > 0 and int(out["exact"][1].from_bank) > 0
  assert int(out["masked"][1].from_bank) == 0 and int(out["t0"][1].redirected) == 0


def test_a_new_threshold_or_expert_does_not_recompile_the_layer():
  layer, (wi, wo) = _topk_layer(11, [0, 1, 2], "selective")
  bank = (jnp.asarray(wi), jnp.asarray(wo))
  graphdef, _ = nnx.split(layer)

  @jax.jit
  def step(state, x):
    return nnx.merge(graphdef, state)(x, None, bank)[1].from_bank

  x = np.random.default_rng(12).standard_normal((2, 12, D)).astype(np.float32)
  seen = []
  for threshold in (0.0, 0.3, 2.0):
    layer.selective_threshold[...] = threshold
    seen.append(int(step(nnx.state(layer), x)))
  layer.put_expert(1, 4, wi[4], wo[4])
  seen.append(int(step(nnx.state(layer), x)))
  assert step._cache_size() == 1
  assert seen[0] > seen[1] > seen[2] == 0


def test_selective_routing_needs_the_bank():
  layer, _ = _topk_layer(0, [0, 1], "selective")
  with pytest.raises(ValueError, match="selective routing needs the host expert bank"):
    layer(np.zeros((1, 2, D), np.float32))
  with pytest.raises(ValueError, match="routing must be one of"):
    VirtualExpertMoE(D, F, 4, 2, None, routing="sometimes", rngs=nnx.Rngs(0))


# --- the policy, end to end --------------------------------------------------------------------------

_BACKEND_COMPILES = []


def _listener(name, _duration, **_):
  if name == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_listener)

SHAPE = dict(max_batch_size=2, max_source_len=16, max_new_tokens=12)


@pytest.fixture(scope="module")
def builtin():
  return swapmoe_jax.default_checkpoint()


def _prompts(seed, vocab):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (2, 12))
  mask = np.ones(ids.shape, bool)
  mask[1, 9:] = False
  return ids, mask


def test_builtin_threshold_0_gives_full_tokens_and_2_gives_swapmoe_tokens(builtin):
  vocab = ckpt.read_metadata(builtin).config.vocab_size
  full = swapmoe_jax.load(builtin, **SHAPE)
  exact = swapmoe_jax.load(builtin, experts=3, policy="selective", selective_threshold=0.0, **SHAPE)
  # Swaps at every call: the same importance drives both controllers, so they swap the same experts
  # (swapmoe without its prompt residency, which selective does not have by default), on the same
  # allocation (swapmoe's searched one; selective has none stored and would plan by coverage).
  slots = swapmoe_jax.load(builtin, experts=3, **SHAPE).plan.slots_per_layer
  masked = {p: swapmoe_jax.load(builtin, experts=3, policy=p, update_every=1, max_swaps_per_step=2, planner=slots,
                                **SHAPE, **({"selective_threshold": 2.0} if p == "selective" else
                                            {"prompt_residency": False}))
            for p in ("selective", "swapmoe")}
  for seed in range(3):
    ids, mask = _prompts(seed, vocab)
    np.testing.assert_array_equal(exact.generate(ids, mask, max_new_tokens=12), full.generate(ids, mask, max_new_tokens=12))
    a, b = (m.generate(ids, mask, max_new_tokens=12) for m in masked.values())
    np.testing.assert_array_equal(a, b)
  # No swaps (load has no max_swaps_per_step=0; a window longer than the request reads the statistics
  # only at its end, so a first request runs on the initial residents): `pruned`'s tokens, on one
  # allocation (pruned has a searched allocation of its own).
  static = {p: swapmoe_jax.load(builtin, experts=3, policy=p, update_every=64, planner=slots, **SHAPE,
                                **({"selective_threshold": 2.0} if p == "selective" else {}))
            for p in ("selective", "pruned")}
  a, b = (m.generate(*_prompts(3, vocab), max_new_tokens=12) for m in static.values())
  np.testing.assert_array_equal(a, b)
  s = exact.stats.summary()
  assert s["policy"] == "selective" and s["redirected"] == 0 and s["from_bank"] > 0 and s["misses"] > 0
  sel, swp = (m.stats.summary() for m in masked.values())
  assert sel["experts_swapped"] == swp["experts_swapped"] > 0
  assert sel["redirected"] == swp["redirected"] > 0 and sel["from_bank"] == 0
  assert sel["resident"] == swp["resident"]
  assert static["selective"].stats.summary()["experts_swapped"] == 0
  assert static["selective"].stats.summary()["redirected"] > 0
  assert loader.needs_pinned("selective", "pageable") and exact._banks is not None


def test_builtin_swaps_and_new_thresholds_never_recompile(builtin):
  vocab = ckpt.read_metadata(builtin).config.vocab_size
  model = swapmoe_jax.load(builtin, experts=3, policy="selective", update_every=1, max_swaps_per_step=2,
                           **SHAPE)
  model.generate(*_prompts(20, vocab), max_new_tokens=12)  # warm-up: every program compiled once
  before, swapped = len(_BACKEND_COMPILES), model.stats.summary()["experts_swapped"]
  counts = []
  for seed, threshold in zip(range(21, 25), (0.0, 0.2, 2.0, 0.5)):
    model.set_selective_threshold(threshold)
    totals = dict(model.stats.totals)
    model.generate(*_prompts(seed, vocab), max_new_tokens=12)
    counts.append({k: model.stats.totals[k] - totals[k] for k in ("redirected", "from_bank")})
  assert len(_BACKEND_COMPILES) == before, "a swap or a new threshold recompiled"
  assert model.stats.summary()["experts_swapped"] > swapped
  assert counts[0]["redirected"] == 0 and counts[0]["from_bank"] > 0  # threshold 0: every miss from the bank
  assert counts[2]["from_bank"] == 0 and counts[2]["redirected"] > 0  # threshold 2: every miss redirected
  assert "from bank" in str(model.stats)


def test_selective_threshold_arguments_are_checked(builtin):
  with pytest.raises(ValueError, match="policy 'selective' only"):
    swapmoe_jax.load(builtin, experts=3, policy="swapmoe", selective_threshold=0.1)
  with pytest.raises(ValueError, match=">= 0"):
    swapmoe_jax.load(builtin, experts=3, policy="selective", selective_threshold=float("nan"))
  model = swapmoe_jax.load(builtin, experts=3, policy="pruned", **SHAPE)
  with pytest.raises(ValueError, match="policy 'selective' only"):
    model.set_selective_threshold(0.2)


def _thresholds(model) -> dict[str, set]:
  """The selective thresholds of the model's MoE layers, by stack."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if "selective_threshold" in keys:
      out.setdefault(keys[0], set()).add(float(np.asarray(leaf)))
  return out


def test_builtin_selective_encoder_off_redirects_the_encoder_and_serves_the_decoder(builtin):
  """selective_encoder=False: the encoder computes what masked routing computes on the same residents,
  the decoder still reads its misses from the bank; a new threshold leaves the encoder masked."""
  from swapmoe_jax.moe.layer import NEVER_THRESHOLD

  vocab = ckpt.read_metadata(builtin).config.vocab_size
  # No swap during a first request; 3 in every layer (the stored calibration gives the decoder layers
  # experts enough that these prompts miss none there).
  static = dict(experts=3, update_every=64, planner="uniform", **SHAPE)
  dec_only = swapmoe_jax.load(builtin, policy="selective", selective_threshold=0.0, selective_encoder=False, **static)
  exact = swapmoe_jax.load(builtin, policy="selective", selective_threshold=0.0, **static)
  pruned = swapmoe_jax.load(builtin, policy="pruned", **static)
  assert _thresholds(dec_only) == {"encoder": {NEVER_THRESHOLD}, "decoder": {0.0}}
  ids, mask = _prompts(30, vocab)
  enc = np.asarray(dec_only.encode(ids, mask))
  np.testing.assert_allclose(enc, np.asarray(pruned.encode(ids, mask)), rtol=1e-6, atol=1e-6)
  assert np.abs(enc - np.asarray(exact.encode(ids, mask))).max() > 1e-3  # the exact encoder differs
  dec_only.generate(ids, mask, max_new_tokens=12)
  s = dec_only.stats.summary()
  assert s["redirected"] > 0 and s["from_bank"] > 0  # the encoder's misses redirected, the decoder's read
  exact.generate(ids, mask, max_new_tokens=12)
  assert exact.stats.summary()["redirected"] == 0
  dec_only.set_selective_threshold(0.3)
  assert _thresholds(dec_only) == {"encoder": {NEVER_THRESHOLD}, "decoder": {np.float32(0.3).item()}}


def test_selective_encoder_arguments_are_checked(builtin, qwen2_moe):
  with pytest.raises(ValueError, match="policy 'selective' only"):
    swapmoe_jax.load(builtin, experts=3, policy="swapmoe", selective_encoder=False)
  with pytest.raises(ValueError, match="True or False"):
    swapmoe_jax.load(builtin, experts=3, policy="selective", selective_encoder="no")
  with pytest.raises(ValueError, match="encoder-decoder models"):
    swapmoe_jax.load(qwen2_moe[1], experts=1, policy="selective", selective_encoder=False)


# --- a decoder-only model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
  from checkpoints_conv import convert
  from hf_fixtures import make_decoder_model

  root = tmp_path_factory.mktemp("selective_qwen2_moe")
  hf = make_decoder_model("qwen2_moe", seed=3)
  hf.save_pretrained(root / "hf")
  return hf.config, convert(root / "hf", root / "converted", dtype="float32", progress=False)


def test_decoder_selective_generate_at_threshold_0_equals_full(qwen2_moe):
  """Top-2 with one resident expert of four (the shared expert aside): at threshold 0 every miss is read
  from the bank (`full`'s logits and tokens); at threshold 2 the routing is masked routing's, where a
  token has fewer available experts than k (`swapmoe`'s tokens, no swaps on either side)."""
  hf_cfg, folder = qwen2_moe
  ids = np.array([[0, 0, 5, 17, 33, 9], [23, 7, 64, 3, 8, 12]])
  mask = ids != 0
  full = swapmoe_jax.load(folder)
  limits = dict(max_batch_size=2, max_source_len=16, max_new_tokens=10)
  model = swapmoe_jax.load(folder, experts=1, policy="selective", selective_threshold=0.0, **limits)
  np.testing.assert_allclose(np.asarray(model(ids, mask)), np.asarray(full(ids, mask)), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=10, steps_per_call=4),
                                full.generate(ids, mask, max_new_tokens=10, steps_per_call=4))
  assert model.stats.totals["from_bank"] > 0 and model.stats.totals["redirected"] == 0
  # One request, within one statistics window (see the Switch test above): no swap on either side.
  swapmoe = swapmoe_jax.load(folder, experts=1, policy="swapmoe", update_every=64, **limits)
  static = swapmoe_jax.load(folder, experts=1, policy="selective", selective_threshold=2.0, update_every=64,
                            **limits)
  np.testing.assert_array_equal(static.generate(ids, mask, max_new_tokens=10, steps_per_call=4),
                                swapmoe.generate(ids, mask, max_new_tokens=10, steps_per_call=4))
  assert static.stats.totals["from_bank"] == 0 and static.stats.totals["redirected"] > 0
  assert static.stats.totals["experts_swapped"] == swapmoe.stats.totals["experts_swapped"] == 0
