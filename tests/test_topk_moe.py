"""VirtualExpertMoE for decoder-only families: top-k routing without capacity, GLU experts, the shared expert.

Checked against a numpy reference written here (masked and exact routing, both gate modes, with and
without `norm_topk_prob`, statistics), against HF's sparse-MoE blocks (Mixtral, Qwen2-MoE with its
shared expert, Qwen3-MoE, OLMoE) in float32, and for recompiles when experts are swapped.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swapmoe_jax import VirtualExpertMoE
from swapmoe_jax.moe import activations
from swapmoe_jax.moe import experts as experts_lib

D, F, FS, E = 8, 12, 10, 6


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _silu(h):
  return h / (1 + np.exp(-h))


# --- numpy reference ---------------------------------------------------------------------------


def _ref_ffn(x, wi, wo, glu):
  """x: [D]; wi: [F or 2F, D]; wo: [D, F] -> [D] (float64)."""
  h = wi @ x
  h = _silu(h[:F]) * h[F:] if glu else _silu(h)
  return wo @ h


def _reference(x, router_w, wi, wo, resident, k, *, exact, gate_mode, norm, glu, shared=None, norms=None,
               mask=None):
  """Top-k MoE in float64, token by token. x: [B, T, D]; router_w: [D, E]; wi/wo: every expert's
  weights; resident: bool[E]; shared: (wi [2Fs, D], wo [D, Fs], gate [D, 1]) or None.
  Returns y [B, T, D], the served (expert, gate) pairs per token and the statistics."""
  x = np.asarray(x, np.float64)
  norms = np.ones(E) if norms is None else norms
  mask = np.ones(x.shape[:2], bool) if mask is None else mask
  y = np.zeros_like(x)
  served_pairs = {}
  stats = dict(importance=np.zeros(E), wanted=np.zeros(E, int), served=np.zeros(E, int), redirected=0, misses=0)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      logits = x[b, t] @ router_w
      p = np.exp(logits - logits.max())
      p /= p.sum()
      order = np.argsort(-p, kind="stable")
      wanted = order[:k]
      chosen = wanted if exact else np.array([e for e in order if resident[e]][:k])
      g = p[chosen]
      if not exact and gate_mode == "renormalized":
        g = g / p[resident].sum()
      if norm:
        g = g / g.sum()
      for e, ge in zip(chosen, g):
        y[b, t] += ge * _ref_ffn(x[b, t], wi[e], wo[e], glu)
      if shared is not None:
        s_wi, s_wo, s_gate = shared
        h = s_wi @ x[b, t]
        fs = s_wo.shape[1]
        y[b, t] += 1 / (1 + np.exp(-(x[b, t] @ s_gate))) * (s_wo @ (_silu(h[:fs]) * h[fs:]))
      served_pairs[b, t] = dict(zip(chosen.tolist(), g.tolist()))
      if mask[b, t]:
        for e in wanted:
          stats["importance"][e] += np.linalg.norm(x[b, t]) * p[e] * norms[e]
          stats["wanted"][e] += 1
          stats["misses"] += int(not resident[e])
        for e in chosen:
          stats["served"][e] += 1
          stats["redirected"] += int(e not in wanted)
  return y, served_pairs, stats


# --- fixtures ----------------------------------------------------------------------------------


def _weights(seed, glu=True):
  rng = np.random.default_rng(seed)
  rows = 2 * F if glu else F
  return dict(
      router_w=rng.normal(size=(D, E)).astype(np.float32),
      wi=(rng.normal(size=(E, rows, D)) / np.sqrt(D)).astype(np.float32),
      wo=(rng.normal(size=(E, D, F)) / np.sqrt(F)).astype(np.float32),
      shared=((rng.normal(size=(2 * FS, D)) / np.sqrt(D)).astype(np.float32),
              (rng.normal(size=(D, FS)) / np.sqrt(FS)).astype(np.float32),
              rng.normal(size=(D, 1)).astype(np.float32)),
      norms=rng.uniform(0.5, 2.0, E).astype(np.float32),
  )


def _layer(w, resident, *, k=2, glu=True, shared=False, **kw):
  layer = VirtualExpertMoE(D, F, E, max(len(resident), 1), None, act="silu", top_k=k, rngs=nnx.Rngs(0),
                           expert_kind="glu" if glu else "mlp", shared_d_ff=FS if shared else None, **kw)
  layer.router_w[...] = jnp.asarray(w["router_w"])
  layer.norms[...] = jnp.asarray(w["norms"])
  layer.place_experts(resident, w["wi"], w["wo"])
  if shared:
    layer.shared_wi[...], layer.shared_wo[...], layer.shared_gate[...] = map(jnp.asarray, w["shared"])
  return layer


def _run(layer, x, mask=None, bank=None):
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, x, mask, bank):
    return nnx.merge(graphdef, state)(x, mask, bank)

  return step(state, x, mask, bank)


def _inputs(seed, b, t):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, t, D)).astype(np.float32)
  mask = rng.random((b, t)) < 0.8
  return x, mask


# Token counts on both sides of experts.GATHER_MAX_TOKENS (pairs: B·T·k).
SHAPES = [(1, 3), (2, 12)]


def _check_against_reference(layer, w, resident, k, x, mask, *, exact=False, gate_mode="original", norm=False,
                             glu=True, shared=False):
  bank = (jnp.asarray(w["wi"]), jnp.asarray(w["wo"])) if exact else None
  y, stats, routing = _run(layer, x, mask, bank)
  res = np.zeros(E, bool)
  res[resident] = True
  ref_y, ref_pairs, ref_stats = _reference(x, w["router_w"], w["wi"], w["wo"], res, k, exact=exact,
                                           gate_mode=gate_mode, norm=norm, glu=glu,
                                           shared=w["shared"] if shared else None, norms=w["norms"], mask=mask)
  assert _rel(y, ref_y) < 1e-5
  expected_shape = x.shape[:2] + ((k,) if k > 1 else ())
  assert all(f.shape == expected_shape for f in jax.tree.leaves(routing))
  chosen, gate, keep = (np.asarray(a).reshape(x.shape[:2] + (k,)) for a in (routing.chosen, routing.gate, routing.keep))
  for (b, t), pairs in ref_pairs.items():
    got = {int(e): float(g) for e, g, kept in zip(chosen[b, t], gate[b, t], keep[b, t]) if kept}
    assert got.keys() == pairs.keys()
    np.testing.assert_allclose([got[e] for e in pairs], list(pairs.values()), rtol=1e-5)
  np.testing.assert_allclose(stats.importance, ref_stats["importance"], rtol=1e-5)
  for name in ("wanted", "served", "redirected", "misses"):
    np.testing.assert_array_equal(getattr(stats, name), ref_stats[name], err_msg=name)
  assert stats.importance.shape == stats.wanted.shape == stats.served.shape == (E,)


# --- masked and exact routing against the reference ----------------------------------------------


@pytest.mark.parametrize("b, t", SHAPES)
@pytest.mark.parametrize("gate_mode", ["original", "renormalized"])
@pytest.mark.parametrize("norm", [False, True])
def test_masked_topk_matches_the_reference(b, t, gate_mode, norm):
  w = _weights(1)
  resident = [4, 0, 2]
  layer = _layer(w, resident, gate_mode=gate_mode, norm_topk_prob=norm)
  x, mask = _inputs(2, b, t)
  _check_against_reference(layer, w, resident, 2, x, mask, gate_mode=gate_mode, norm=norm)


@pytest.mark.parametrize("k, resident", [(1, [3, 1]), (3, [5, 2, 0, 1]), (3, [2])])
def test_masked_topk_other_k_mlp_experts_and_fewer_slots_than_k(k, resident):
  """k = 1 keeps [B, T] routing fields; with K < k a token is served by all K resident experts."""
  w = _weights(3, glu=False)
  layer = _layer(w, resident, k=k, glu=False, norm_topk_prob=True)
  for b, t in SHAPES:
    x, mask = _inputs(4, b, t)
    _check_against_reference(layer, w, resident, k, x, mask, norm=True, glu=False)


@pytest.mark.parametrize("b, t", SHAPES)
@pytest.mark.parametrize("norm", [False, True])
def test_exact_topk_with_the_host_bank_equals_the_fully_resident_layer(b, t, norm):
  w = _weights(5)
  x, mask = _inputs(6, b, t)
  exact = _layer(w, [1, 5], routing="exact", norm_topk_prob=norm, shared=True)
  full = _layer(w, list(range(E)), norm_topk_prob=norm, shared=True)
  _check_against_reference(exact, w, [1, 5], 2, x, mask, exact=True, norm=norm, shared=True)
  y_exact, stats, _ = _run(exact, x, mask, (jnp.asarray(w["wi"]), jnp.asarray(w["wo"])))
  y_full, full_stats, _ = _run(full, x, mask)
  np.testing.assert_allclose(y_exact, y_full, rtol=1e-5, atol=1e-6)
  assert int(stats.misses) > 0 and int(full_stats.misses) == 0
  np.testing.assert_array_equal(stats.served, full_stats.served)


def test_the_shared_expert_is_added_to_every_token():
  w = _weights(7)
  x, mask = _inputs(8, 2, 5)
  _check_against_reference(_layer(w, [0, 3, 4], shared=True), w, [0, 3, 4], 2, x, mask, shared=True)


# --- the two expert FFN paths ------------------------------------------------------------------


@pytest.mark.parametrize("glu", [False, True])
def test_gather_and_dispatch_agree_on_token_choice_pairs(glu):
  rng = np.random.default_rng(9)
  n, k, slots = 10, 3, 5
  x = rng.normal(size=(n, D)).astype(np.float32)
  wi = rng.normal(size=(slots, 2 * F if glu else F, D)).astype(np.float32)
  wo = rng.normal(size=(slots, D, F)).astype(np.float32)
  slot = np.stack([rng.permutation(slots)[:k] for _ in range(n)]).reshape(-1).astype(np.int32)  # distinct per token
  keep = rng.random(n * k) < 0.8
  pairs_x = np.repeat(x, k, axis=0)
  act = activations.expert_hidden("silu", "glu" if glu else "mlp")
  a = experts_lib.expert_ffn(pairs_x, slot, wi, wo, act, keep=keep, capacity=n, grouped=False)
  c = experts_lib.expert_ffn(pairs_x, slot, wi, wo, act, keep=keep, capacity=n, grouped=True)
  ref = np.stack([_ref_ffn(pairs_x[j].astype(np.float64), wi[slot[j]], wo[slot[j]], glu) for j in range(n * k)])
  assert _rel(a, ref) < 1e-5
  np.testing.assert_allclose(np.asarray(c), np.where(keep[:, None], ref, 0), rtol=1e-5, atol=1e-5)
  miss = experts_lib.expert_ffn_misses(pairs_x, slot, keep, wi, wo, act)  # the bank path, same weights
  np.testing.assert_allclose(np.asarray(miss), np.where(keep[:, None], ref, 0), rtol=1e-5, atol=1e-5)


def test_bank_misses_read_one_copy_per_row_only_in_a_decode_step():
  """A decode step of few rows copies one expert per row at once (the plan counts B·k copies,
  `budget.bank_read_experts`); a prefill of as few rows copies one missing expert at a time, in a scan
  (the plan counts one). Both compute every missing row through its expert."""
  rng = np.random.default_rng(4)
  n, e = 6, 5
  x = rng.normal(size=(n, D)).astype(np.float32)
  wi, wo = rng.normal(size=(e, F, D)).astype(np.float32), rng.normal(size=(e, D, F)).astype(np.float32)
  expert = rng.integers(0, e, n).astype(np.int32)
  miss = np.array([True, False, True, True, False, True])
  act = activations.expert_hidden("silu", "mlp")
  ref = np.stack([_ref_ffn(x[j].astype(np.float64), wi[expert[j]], wo[expert[j]], False) for j in range(n)])
  for decode in (True, False):
    fn = lambda x, wi, wo, decode=decode: experts_lib.expert_ffn_misses(x, expert, miss, wi, wo, act, decode)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fn(x, wi, wo)), np.where(miss[:, None], ref, 0), rtol=1e-5, atol=1e-5)
    scans = [q for q in jax.make_jaxpr(fn)(x, wi, wo).jaxpr.eqns if q.primitive.name == "scan"]
    assert len(scans) == (0 if decode else 1)


@pytest.mark.parametrize("impl", ["rows", "branches", "all_slots"])
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("glu", [False, True])
def test_each_gather_implementation_computes_each_rows_expert(impl, n, glu):
  """The three ways the gather path reads experts (chosen by expert size on the device) are one function."""
  rng = np.random.default_rng(n)
  slots = 5
  x = rng.normal(size=(n, D)).astype(np.float32)
  wi = rng.normal(size=(slots, 2 * F if glu else F, D)).astype(np.float32)
  wo = rng.normal(size=(slots, D, F)).astype(np.float32)
  slot = rng.integers(0, slots, n).astype(np.int32)
  act = activations.expert_hidden("silu", "glu" if glu else "mlp")
  got = jax.jit(lambda *a: experts_lib._ffn_gather(*a, act, impl=impl))(x, slot, wi, wo)
  ref = np.stack([_ref_ffn(x[j].astype(np.float64), wi[slot[j]], wo[slot[j]], glu) for j in range(n)])
  assert _rel(got, ref) < 1e-5


def test_gather_implementation_follows_expert_size():
  big = experts_lib.BIG_EXPERT_BYTES
  assert experts_lib.gather_impl(2, 8, big - 1) == "rows"  # switch-base's 9 MiB experts, any count
  assert experts_lib.gather_impl(16, 2, big - 1) == "rows"
  assert experts_lib.gather_impl(2, 8, big) == "branches"  # Mixtral's 336 MiB: top-2 of one token, 8 slots
  assert experts_lib.gather_impl(8, 8, big) == "all_slots"  # as many rows as slots: read each slot once
  # A Mixtral-sized layer picks branches inside the model's step (the jaxpr holds the switch).
  x = jnp.zeros((2, 4), jnp.bfloat16)
  wi = jax.ShapeDtypeStruct((3, big // 16, 4), jnp.bfloat16)  # 2 * (big/16 * 4) * 2 bytes = big per expert
  wo = jax.ShapeDtypeStruct((3, 4, big // 16), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda x, s, a, b: experts_lib._ffn_gather(x, s, a, b, jax.nn.relu))(
      x, jnp.zeros((2,), jnp.int32), wi, wo)
  assert "cond" in str(jaxpr) and "dynamic_slice" not in str(jaxpr)


def test_layer_gather_and_dispatch_paths_agree():
  """The same tokens through the layer one row at a time (gather) and all at once (dispatch)."""
  w = _weights(10)
  layer = _layer(w, [0, 2, 3, 5], shared=True)
  x, _ = _inputs(11, 4, 6)  # 48 pairs: dispatch
  y, _, _ = _run(layer, x)
  rows = [np.asarray(_run(layer, x[i:i + 1, j:j + 2])[0]) for i in range(4) for j in range(0, 6, 2)]  # 4 pairs
  np.testing.assert_allclose(np.concatenate(rows, axis=1).reshape(4, 6, D), y, rtol=1e-5, atol=1e-6)


# --- against Hugging Face's sparse-MoE blocks --------------------------------------------------


def _hf_block(family, seed):
  import torch

  torch.manual_seed(seed)
  common = dict(hidden_size=D, num_experts_per_tok=2, hidden_act="silu")
  if family == "mixtral":
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    block, norm = MixtralSparseMoeBlock(MixtralConfig(intermediate_size=F, num_local_experts=E, **common)), True
  elif family == "qwen2_moe":
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    block, norm = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(moe_intermediate_size=F, shared_expert_intermediate_size=FS,
                                                        num_experts=E, norm_topk_prob=False, **common)), False
  elif family == "qwen3_moe":
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    block, norm = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, norm_topk_prob=True,
                                                        **common)), True
  else:
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    block, norm = OlmoeSparseMoeBlock(OlmoeConfig(intermediate_size=F, num_experts=E, norm_topk_prob=False,
                                                  **common)), False
  with torch.no_grad():
    for p in block.parameters():  # the experts start as torch.empty
      p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    block.gate.weight.mul_(4.0)  # decisive routing
  return block.eval(), norm


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_one_layer_matches_the_hf_sparse_moe_block(family):
  import torch

  block, norm = _hf_block(family, seed=12)
  shared = hasattr(block, "shared_expert")
  layer = VirtualExpertMoE(D, F, E, E, None, act="silu", top_k=2, norm_topk_prob=norm, expert_kind="glu",
                           shared_d_ff=FS if shared else None, rngs=nnx.Rngs(0))
  t = lambda p: p.detach().numpy()  # noqa: E731
  layer.router_w[...] = jnp.asarray(t(block.gate.weight).T)
  layer.place_experts(np.arange(E), t(block.experts.gate_up_proj), t(block.experts.down_proj))
  if shared:
    s = block.shared_expert
    layer.shared_wi[...] = jnp.asarray(np.concatenate([t(s.gate_proj.weight), t(s.up_proj.weight)]))
    layer.shared_wo[...] = jnp.asarray(t(s.down_proj.weight))
    layer.shared_gate[...] = jnp.asarray(t(block.shared_expert_gate.weight).T)
  for b, n in SHAPES:
    x = np.random.default_rng(b * 100 + n).normal(size=(b, n, D)).astype(np.float32)
    with torch.no_grad():
      ref = block(torch.from_numpy(x)).numpy()
    assert _rel(_run(layer, x)[0], ref) < 1e-5, (family, b, n)


# --- swaps never recompile ---------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["masked", "exact"])
def test_swapping_experts_does_not_recompile(routing):
  w = _weights(13)
  layer = _layer(w, [0, 1, 2], routing=routing, shared=True)
  bank = (jnp.asarray(w["wi"]), jnp.asarray(w["wo"]))
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, x):
    return nnx.merge(graphdef, state)(x, None, bank if routing == "exact" else None)[0]

  x, _ = _inputs(14, 2, 12)
  outs = [step(state, x)]
  assert layer.put_expert(1, 4, w["wi"][4], w["wo"][4]) == 1
  outs.append(step(nnx.state(layer), x))
  layer.place_experts([5, 3, 4], w["wi"], w["wo"])
  outs.append(step(nnx.state(layer), x))
  assert step._cache_size() == 1
  if routing == "exact":  # any residency gives the same outputs
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-6)
  else:
    assert _rel(outs[1], outs[0]) > 1e-3  # the swap changed what serves the tokens


# --- arguments and expert parallelism ----------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(capacity=4, top_k=2), "capacity applies to top-1"), (dict(capacity=None, top_k=7), r"top_k must be in"),
    (dict(capacity=None, expert_kind="swiglu"), "expert_kind"), (dict(capacity=4, norm_topk_prob=True), "norm_topk"),
    (dict(capacity=None, shared_d_ff=0), "shared_d_ff"),
])
def test_bad_arguments_are_one_clear_error(kw, message):
  capacity = kw.pop("capacity")
  with pytest.raises(ValueError, match=message):
    VirtualExpertMoE(D, F, E, 3, capacity, rngs=nnx.Rngs(0), **kw)


_EXPERT_PARALLEL = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from swapmoe_jax.moe import parallel
  import test_topk_moe as t

  assert len(jax.devices()) == 2
  w = t._weights(15)
  bank = (jnp.asarray(w["wi"]), jnp.asarray(w["wo"]))
  for routing in ("masked", "exact"):
    for b, n in t.SHAPES:
      x, mask = t._inputs(16, b, n)
      one = t._layer(w, [0, 2, 3, 5], routing=routing, shared=True)
      two = t._layer(w, [0, 2, 3, 5], routing=routing, shared=True)
      two.expert_mesh = parallel.expert_mesh(2)
      ref, got = t._run(one, x, mask, bank), t._run(two, x, mask, bank)
      np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
      for a, c in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(ref[1:])):
        np.testing.assert_array_equal(a, c)
  print("ok")
""")


def test_expert_parallel_top_k_equals_one_device():
  """Slots split over 2 simulated CPU devices (in a subprocess, so that this process keeps one device)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
  out = subprocess.run([sys.executable, "-c", _EXPERT_PARALLEL], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
