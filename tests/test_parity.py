"""Parity with transformers' PyTorch SwitchTransformersForConditionalGeneration, through the real
converter and loader: encoder output and logits within 1e-5, routing decisions identical, greedy
generation identical, component by component so a failure points at its layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import swapmoe_jax
from swapmoe_jax.models.switch import layers
from swapmoe_jax.moe import experts as experts_lib

# name -> (HF config overrides, router_std). Each covers a semantic the others don't.
CONFIGS = {
    "step1_e4_tied": (dict(), 4.0),
    "step2_e8_untied": (dict(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                             num_sparse_decoder_layers=2, num_experts=8, tie_word_embeddings=False), 4.0),
    "capacity_drops": (dict(expert_capacity=2), 1.0),
    "gelu_bias": (dict(dense_act_fn="gelu_new", router_bias=True, num_layers=3, num_decoder_layers=3,
                       num_sparse_encoder_layers=1, num_sparse_decoder_layers=1), 4.0),
}
# Generation tests use the same configs with initializer_factor=8: HF's default initialisation makes
# tiny random models repeat one token, which would make "identical generations" a weak test. (Their
# larger activations amplify float32 rounding, so logits are compared on the default-init models.)
GEN_FACTOR = 8.0


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))


def _inputs(seed=0, batch=3, src=11, tgt=7, vocab=96):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (batch, src))
  ids[1, 8:] = 0  # padding
  ids[2, 5:] = 0
  mask = (ids != 0).astype(np.int64)
  dec = rng.integers(3, vocab, (batch, tgt))
  dec[:, 0] = 0
  return ids, mask, dec


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  from checkpoints_conv import convert
  from hf_fixtures import make_hf_model, save_hf, tiny_config

  out = {}
  for name, (overrides, router_std) in CONFIGS.items():
    for key, extra in ((name, {}), ((name, "gen"), dict(initializer_factor=GEN_FACTOR))):
      root = tmp_path_factory.mktemp(name)
      hf = make_hf_model(tiny_config(**overrides, **extra), seed=len(out), router_std=router_std)
      folder = convert(save_hf(hf, root / "hf"), root / "ours", progress=False)
      out[key] = hf, swapmoe_jax.load(folder)
  return out


def test_untied_stacks_really_have_their_own_embeddings(pairs):
  hf, _ = pairs["step2_e8_untied"]
  assert not torch.equal(hf.encoder.embed_tokens.weight, hf.shared.weight)
  assert not torch.equal(hf.encoder.embed_tokens.weight, hf.decoder.embed_tokens.weight)


def _hf_forward(hf, ids, mask, dec):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
              output_router_logits=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_encoder_match(pairs, name):
  hf, ours = pairs[name]
  ids, mask, dec = _inputs()
  ref = _hf_forward(hf, ids, mask, dec)
  assert _rel(ours.encode(ids, mask), ref.encoder_last_hidden_state.numpy()) < 1e-5
  assert _rel(ours(ids, mask, dec), ref.logits.numpy()) < 1e-5


def _moe_modules(hf, stack):
  blocks = getattr(hf, stack).block
  return {i: blk.layer[-1].mlp for i, blk in enumerate(blocks) if blk.is_sparse}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_layers_match_component_by_component(pairs, name):
  """Each sparse MLP, fed HF's own input, gives HF's output and HF's exact expert choices and drops."""
  hf, ours = pairs[name]
  ids, mask, dec = _inputs(seed=1)
  captured = {}
  hooks = []
  for stack in ("encoder", "decoder"):
    for i, mlp in _moe_modules(hf, stack).items():
      def hook(mod, args, out, key=(stack, i)):
        captured[key] = (args[0].numpy(), out.numpy())
      hooks.append(mlp.register_forward_hook(hook))
      def rhook(mod, args, out, key=(stack, i)):
        captured[key + ("router",)] = out[0].numpy()  # one-hot dispatch after capacity [B, T, E]
      hooks.append(mlp.router.register_forward_hook(rhook))
  _hf_forward(hf, ids, mask, dec)
  for h in hooks:
    h.remove()
  model = nnx.merge(ours.graphdef, ours.params, ours.slots)
  assert captured, "no sparse layers captured"
  checked = 0
  for key, val in captured.items():
    if len(key) != 2:
      continue
    stack, i = key
    x, y_ref = val
    y, _, routing = getattr(model, stack).blocks[i].moe(x)
    assert _rel(y, y_ref) < 1e-5, f"{stack} block {i}: MoE output differs"
    dispatch = captured[key + ("router",)]
    hf_kept = dispatch.sum(-1) > 0
    np.testing.assert_array_equal(np.asarray(routing.keep), hf_kept, err_msg=f"{stack} {i}: capacity drops")
    np.testing.assert_array_equal(np.asarray(routing.chosen)[hf_kept], dispatch.argmax(-1)[hf_kept],
                                  err_msg=f"{stack} {i}: expert choices")
    checked += 1
  assert checked == len(ours.config.moe_layers)


def test_capacity_config_really_drops(pairs):
  hf, _ = pairs["capacity_drops"]
  ids, mask, dec = _inputs(seed=1)
  drops = []
  hook = hf.encoder.block[0].layer[-1].mlp.router.register_forward_hook(
      lambda m, a, out: drops.append(int((out[0].sum(-1) == 0).sum())))
  _hf_forward(hf, ids, mask, dec)
  hook.remove()
  assert drops[0] > 0, "the capacity test config must drop tokens to test HF's rule"


@pytest.mark.parametrize("name", ["step1_e4_tied", "step2_e8_untied", "gelu_bias"])
def test_greedy_generation_matches_hf(pairs, name):
  hf, ours = pairs[name, "gen"]
  ids, mask, _ = _inputs(seed=2)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                      do_sample=False).numpy()[:, 1:]  # HF keeps the decoder start token
  got = ours.generate(ids, mask, max_new_tokens=20)
  assert len(set(ref.ravel().tolist())) > 3, "degenerate reference generation"
  np.testing.assert_array_equal(got, ref)


def test_generation_stops_at_eos_and_pads_like_hf(pairs):
  """With an EOS id that row 0 emits early, rows finish at different steps: the finished rows are
  padded, and generation stops once all rows are done — token for token as HF."""
  import dataclasses

  hf, ours = pairs["step1_e4_tied", "gen"]
  ids, mask, _ = _inputs(seed=2)
  free = ours.generate(ids, mask, max_new_tokens=20)
  eos = int(free[0, 2])
  cfg = dataclasses.replace(ours.config, eos_token_ids=(eos,))
  model = swapmoe_jax.SwitchModel(cfg, ours.graphdef, ours.params, ours.slots, dtype=ours.dtype)
  got = model.generate(ids, mask, max_new_tokens=20)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                      do_sample=False, eos_token_id=eos, pad_token_id=cfg.pad_token_id).numpy()[:, 1:]
  np.testing.assert_array_equal(got, ref)
  first = np.flatnonzero(got[0] == eos)[0]
  assert first <= 2 and np.all(got[0, first + 1:] == cfg.pad_token_id)


def test_steps_after_every_rows_eos_skip_the_model(pairs):
  """Once every row is done, the rest of a call's steps skip the model (`skip_finished`): its cache is
  not written (the model did not run), its tokens are pad, and generate's output is unchanged."""
  import dataclasses

  from swapmoe_jax.serving import decode
  from swapmoe_jax.serving.sampling import Sampling

  _, ours = pairs["step1_e4_tied", "gen"]
  ids, mask, _ = _inputs(seed=2)
  eos = int(ours.generate(ids[:1], mask[:1], max_new_tokens=8)[0, 2])
  cfg = dataclasses.replace(ours.config, eos_token_ids=(eos,))
  model = swapmoe_jax.SwitchModel(cfg, ours.graphdef, ours.params, ours.slots, dtype=ours.dtype)
  skipped = model.generate(ids[:1], mask[:1], max_new_tokens=40)
  model.skip_finished = False
  np.testing.assert_array_equal(model.generate(ids[:1], mask[:1], max_new_tokens=40), skipped)
  assert skipped.shape[1] == 3 and skipped[0, -1] == eos

  b = 2
  cache, _ = decode.encode(model._graphdef, model._params, model._slots, ids[:b], mask[:b].astype(bool), 64, None)
  zeros = decode.zero_stats(len(cfg.decoder_sparse_layers), cfg.num_experts)
  args = (model._graphdef, model._params, model._slots, np.full((b,), 5, np.int32), np.ones((b,), bool))
  rest = (np.int32(0), jax.random.key(0), None, zeros, Sampling(), cfg.pad_token_id, cfg.eos_token_ids, 4)
  before = jax.device_get(cache.self_k[0])
  toks, _, _, after, pos, _ = decode.decode_steps(*args, jax.tree.map(jnp.copy, cache), *rest, True)
  np.testing.assert_array_equal(jax.device_get(after.self_k[0]), before)
  assert np.all(np.asarray(toks) == cfg.pad_token_id) and int(pos) == 4
  _, _, _, ran, _, _ = decode.decode_steps(*args, jax.tree.map(jnp.copy, cache), *rest, False)
  assert not np.array_equal(jax.device_get(ran.self_k[0])[:, :, :4], before[:, :, :4]), "the model ran"


def test_steps_past_the_requested_tokens_skip_the_model(pairs):
  """`remaining` (traced): a call's steps from that index on skip the model as finished rows do, so the
  last call of a request runs only the steps it needs; generate's tokens are unchanged."""
  from swapmoe_jax.serving import decode
  from swapmoe_jax.serving.sampling import Sampling

  _, ours = pairs["step1_e4_tied", "gen"]
  ids, mask, _ = _inputs(seed=2)
  cfg = ours.config
  model = swapmoe_jax.SwitchModel(cfg, ours.graphdef, ours.params, ours.slots, dtype=ours.dtype)
  b = 2
  cache, _ = decode.encode(model._graphdef, model._params, model._slots, ids[:b], mask[:b].astype(bool), 64, None)
  zeros = decode.zero_stats(len(cfg.decoder_sparse_layers), cfg.num_experts)
  args = (model._graphdef, model._params, model._slots, np.full((b,), 5, np.int32), np.zeros((b,), bool))
  rest = (np.int32(0), jax.random.key(0), None, zeros, Sampling(), cfg.pad_token_id, (-1,), 4, True)
  before = jax.device_get(cache.self_k[0])
  full_toks, _, _, full_cache, _, full_stats = decode.decode_steps(*args, jax.tree.map(jnp.copy, cache), *rest, None)
  toks, _, _, after, pos, stats = decode.decode_steps(*args, jax.tree.map(jnp.copy, cache), *rest, np.int32(2))
  toks, after_k = np.asarray(toks), jax.device_get(after.self_k[0])
  # Two steps ran as without a limit; the last two wrote nothing and emitted pad.
  np.testing.assert_array_equal(toks[:2], np.asarray(full_toks)[:2])
  assert np.all(toks[2:] == cfg.pad_token_id) and int(pos) == 4
  np.testing.assert_array_equal(after_k[:, :, :2], jax.device_get(full_cache.self_k[0])[:, :, :2])
  np.testing.assert_array_equal(after_k[:, :, 2:], before[:, :, 2:])
  assert int(np.sum(stats.wanted)) * 2 == int(np.sum(full_stats.wanted)), "routing counted 2 of 4 steps"
  for n in (1, 5, 17, 20):
    got = model.generate(ids[:b], mask[:b], max_new_tokens=n)
    model.skip_finished = False
    np.testing.assert_array_equal(got, model.generate(ids[:b], mask[:b], max_new_tokens=n))
    model.skip_finished = True


def test_a_request_routes_only_its_own_steps():
  """Through `load` and the telemetry: a request of 3 tokens (no EOS among them) runs 3 decoder steps,
  not a first step plus a whole call of 16."""
  from swapmoe_jax.builtin.demo import default_checkpoint

  model = swapmoe_jax.load(default_checkpoint(), experts=4, max_batch_size=1, max_source_len=32,
                           max_new_tokens=16)
  ids = model.tokenizer("reverse: cat dog sun moon", return_tensors="np").input_ids
  before = model.residency.totals.wanted.sum(axis=1)
  out = model.generate(ids, max_new_tokens=3)
  assert out.shape == (1, 3) and not np.isin(out, model.config.eos_token_ids).any()
  routed = model.residency.totals.wanted.sum(axis=1) - before  # per MoE layer: tokens routed
  decoder = [i for i, (stack, _) in enumerate(model.config.moe_layers) if stack == "decoder"]
  assert routed[decoder].tolist() == [3] * len(decoder)


def test_incremental_decoding_equals_full_forward(pairs):
  _, ours = pairs["step2_e8_untied"]
  ids, mask, _ = _inputs(seed=4)
  model = nnx.merge(ours.graphdef, ours.params, ours.slots)
  bool_mask = mask.astype(bool)
  enc, _ = model.encode(ids, bool_mask)
  dec = np.random.default_rng(0).integers(3, 96, (3, 9))
  dec[:, 0] = 0
  full, _ = model.decode_full(dec, enc, bool_mask)
  cache = model.init_cache(enc, bool_mask, 16)
  for t in range(dec.shape[1]):
    step, cache, _ = model.decode_step(dec[:, t], np.int32(t), cache)
    assert _rel(step, full[:, t]) < 1e-5, f"position {t}"


@pytest.mark.parametrize("fmt", ["sharded", "bin", "sharded_bin"])
def test_every_source_format_gives_the_same_model(pairs, tmp_path, fmt):
  from checkpoints_conv import convert
  from hf_fixtures import save_hf

  hf, ours = pairs["step1_e4_tied"]
  other = swapmoe_jax.load(convert(save_hf(hf, tmp_path / "hf", fmt=fmt), tmp_path / "out", progress=False))
  ids, mask, dec = _inputs()
  np.testing.assert_array_equal(np.asarray(other(ids, mask, dec)), np.asarray(ours(ids, mask, dec)))


def test_bfloat16_is_close_to_float32(pairs, tmp_path):
  from checkpoints_conv import convert
  from hf_fixtures import save_hf

  hf, ours = pairs["step1_e4_tied"]
  bf = swapmoe_jax.load(convert(save_hf(hf, tmp_path / "hf"), tmp_path / "bf", dtype="bfloat16", progress=False))
  assert bf.dtype == np.dtype("bfloat16") or str(bf.dtype).endswith("bfloat16")
  ids, mask, dec = _inputs()
  assert _rel(bf(ids, mask, dec), ours(ids, mask, dec)) < 5e-2


def test_relative_position_buckets_match_hf():
  from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

  for bidirectional in (True, False):
    for nb, md in ((32, 128), (16, 20), (8, 64)):
      rel = torch.arange(-md - 40, md + 41)
      ref = SwitchTransformersAttention._relative_position_bucket(rel, bidirectional, nb, md).numpy()
      table = layers.relative_position_buckets(bidirectional, nb, md)
      got = table[np.clip(rel.numpy(), -md, md) + md]
      np.testing.assert_array_equal(got, ref, err_msg=f"bidirectional={bidirectional} nb={nb} md={md}")


@pytest.mark.parametrize("n", [3, 40])
def test_gather_and_grouped_dispatch_agree(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((n, 8)).astype(np.float32)
  wi = rng.standard_normal((5, 12, 8)).astype(np.float32)  # [K, F, D]: torch Linear's [out, in]
  wo = rng.standard_normal((5, 8, 12)).astype(np.float32)  # [K, D, F]
  slot = rng.integers(0, 5, n).astype(np.int32)
  act = layers.activation("relu")
  a = experts_lib.expert_ffn(x, slot, wi, wo, act, grouped=False)
  b = experts_lib.expert_ffn(x, slot, wi, wo, act, grouped=True)
  ref = np.stack([np.maximum(wi[slot[j]] @ x[j], 0) @ wo[slot[j]].T for j in range(n)])
  assert _rel(a, ref) < 1e-5 and _rel(b, ref) < 1e-5
  # Dispatch with a mask and a per-slot capacity: a slot keeps its first `cap` kept tokens only.
  keep = rng.random(n) < 0.7
  cap = 2
  c = experts_lib.expert_ffn(x, slot, wi, wo, act, keep=keep, capacity=cap, grouped=True)
  rank = np.array([np.sum((slot[:j] == slot[j]) & keep[:j]) for j in range(n)])
  served = keep & (rank < cap)
  np.testing.assert_allclose(np.asarray(c), np.where(served[:, None], ref, 0), rtol=1e-5, atol=1e-5)


def test_model_accepts_jax_and_numpy_ids_and_rejects_bad_ones(pairs):
  import jax.numpy as jnp

  _, ours = pairs["step1_e4_tied"]
  ids, mask, dec = _inputs()
  np.testing.assert_array_equal(np.asarray(ours(jnp.asarray(ids), mask, dec)), np.asarray(ours(ids, mask, dec)))
  with pytest.raises(swapmoe_jax.InputError, match="integer"):
    ours(ids.astype(np.float32))
  with pytest.raises(swapmoe_jax.InputError, match="outside the vocabulary"):
    ours(ids + 1000)


@pytest.mark.parametrize("dtype, all_highest", [("float32", True), ("bfloat16", False)])
def test_float32_models_multiply_at_highest_precision(dtype, all_highest):
  """JAX's default matmul precision is TF32 on recent NVIDIA GPUs (5 % off HF float32 in logits on an
  H200): a float32 model's programs ask for HIGHEST in every dot; bfloat16 keeps the default, except
  the routers, which always route in float32 at HIGHEST (HF semantics)."""
  import re

  from swapmoe_jax.serving import decode

  m = swapmoe_jax.load(swapmoe_jax.default_checkpoint(), dtype=dtype, max_source_len=32)
  ids = np.ones((1, 8), np.int32)
  text = decode.forward.lower(m._graphdef, m._params, m._slots, ids, ids > 0, np.zeros((1, 4), np.int32), None,  # noqa: SLF001
                              m._banks).as_text()  # noqa: SLF001
  dots = re.findall(r"stablehlo.dot_general.*", text)
  highest = [d for d in dots if re.search(r"precision = \[HIGHEST, HIGHEST\]", d)]
  assert len(dots) > 20
  assert (len(highest) == len(dots)) == all_highest
  assert len(highest) >= m.config.num_moe_layers  # the routers, at least


def test_statistics_copy_starts_behind_the_call_that_closes_its_window(pairs, monkeypatch):
  """A window's routing statistics are packed for the host (`residency._packed`, then an asynchronous
  copy) right after the call that closed the window is dispatched, not when the host reads them
  `READ_LAG_CALLS` calls later: packed at read time, the packing queued behind the call just
  dispatched, and the read waited for that whole call while the GPU then idled (on an H200 `full`'s
  decode p50 went 0.715 -> 0.457 ms). Tokens are unchanged."""
  from swapmoe_jax.serving import decode, residency

  _, ours = pairs["step1_e4_tied", "gen"]
  assert ours.residency is not None
  ids, mask, _ = _inputs(seed=2)
  plain = ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8)
  events = []
  real_call, real_pack = decode.decode_steps, residency._packed
  monkeypatch.setattr(decode, "decode_steps", lambda *a: (events.append(("call", a[13])), real_call(*a))[1])
  monkeypatch.setattr(residency, "_packed", lambda parts: (events.append(("pack",)), real_pack(parts))[1])
  np.testing.assert_array_equal(ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8), plain)
  calls = [i for i, e in enumerate(events) if e[0] == "call"]
  steps = np.cumsum([events[i][1] for i in calls])
  first = int(np.argmax(steps >= ours.residency.update_every))  # the call that closes the first window
  assert steps[first] >= ours.residency.update_every and first + 1 < len(calls)
  # Its statistics are packed before the next call; nothing closed earlier could be read there.
  assert ("pack",) in events[calls[first] + 1:calls[first + 1]]


def test_a_request_ends_as_soon_as_a_ready_call_shows_every_row_done(pairs, monkeypatch):
  """Every row ends at EOS within the second call: reading ready results at once (`engine._ready`)
  stops the request after that call; the lag alone (nothing ever ready before its turn) ran two more
  calls of skipped steps. The tokens are the same either way."""
  import dataclasses

  from swapmoe_jax.serving import decode, engine

  _, ours = pairs["step1_e4_tied", "gen"]
  ids, mask, _ = _inputs(seed=2)
  plain = ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8)
  monkeypatch.setattr(ours, "config", dataclasses.replace(ours.config, eos_token_ids=tuple(
      int(t) for t in np.unique(plain[:, 3]))))  # every row's 4th token ends it, or an earlier one
  real = decode.decode_steps
  runs = {}
  for ready in (True, False):
    calls = []
    monkeypatch.setattr(decode, "decode_steps", lambda *a, calls=calls: (calls.append(a[13]), real(*a))[1])
    monkeypatch.setattr(engine, "_ready", lambda x, ready=ready: ready)
    runs[ready] = (ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8), calls)
  np.testing.assert_array_equal(runs[True][0], runs[False][0])
  assert runs[True][0].shape[1] <= 4
  assert runs[True][1] == [1, 8] and runs[False][1] == [1, 8, 8, 8]


def test_first_token_streams_before_the_next_call_is_dispatched(pairs, monkeypatch):
  """`generate(stream=...)`: the one-step first call's token reaches `stream` before the next device call
  is dispatched (on a GPU a call's kernels launch on the calling thread, so waiting for that dispatch
  held the first token back by a whole call); later tokens come once their call is ready and at most
  two calls behind. Tokens are those of a run without streaming."""
  from swapmoe_jax.serving import decode

  _, ours = pairs["step1_e4_tied", "gen"]
  ids, mask, _ = _inputs(seed=2)
  plain = ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8)
  events = []
  real = decode.decode_steps

  def traced(*args):
    events.append(("call", args[13]))  # num_steps
    return real(*args)

  monkeypatch.setattr(decode, "decode_steps", traced)
  streamed = []
  got = ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8,
                      stream=lambda step, tok: (events.append(("token", step)), streamed.append(tok)))
  np.testing.assert_array_equal(got, plain)
  np.testing.assert_array_equal(np.stack(streamed, axis=1), plain)
  calls = [i for i, e in enumerate(events) if e[0] == "call"]
  assert [events[i][1] for i in calls] == [1] + [8] * 5  # 1 + 5 x 8 steps >= 40 tokens
  assert events.index(("token", 0)) < calls[1]  # the first token before the second call
  assert calls[1] < events.index(("token", 1)) < calls[4]  # the second call's tokens: at most two calls late
  plain_events = []
  monkeypatch.setattr(decode, "decode_steps", lambda *a: (plain_events.append(a[13]), real(*a))[1])
  ours.generate(ids, mask, max_new_tokens=40, steps_per_call=8)  # nobody streams: no early wait, same calls
  assert plain_events == [1] + [8] * 5
