"""Parity of `models.decoder.CausalMoE` with transformers' PyTorch Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Tiny random HF models (float32, GQA, top-2) are copied into `CausalMoE` through `params_from_dense` (the
dense tree built here from the HF state dict, as the converter writes it) and `place_experts`. Checked:
float32 logits within 1e-5 of HF on a left-padded batch, incremental decoding (prefill + decode_step)
equal to the full forward, greedy tokens equal to HF `generate`, and the config reading.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from swapmoe_jax.models.decoder import CausalMoE, ConfigError, DecoderConfig, params_from_dense
from swapmoe_jax.models.decoder import layers

V = 96
_COMMON = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (HF config class, kwargs). Each covers semantics the others don't.
CONFIGS = {
    # every block sparse, top-k renormalised, a sliding window shorter than the prompts, llama3 rope
    "mixtral_window": (transformers.MixtralConfig, dict(
        _COMMON, intermediate_size=24, num_hidden_layers=2, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=5, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=16))),
    # q/k/v bias, a shared expert, a dense block (mlp_only_layers), a sliding window on block 0 only
    "qwen2_moe_shared": (transformers.Qwen2MoeConfig, dict(
        _COMMON, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], qkv_bias=True,
        use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # per-head q/k norm, head_dim != hidden/heads, o bias, renormalised top-k, tied embeddings, linear rope
    "qwen3_moe_tied": (transformers.Qwen3MoeConfig, dict(
        _COMMON, head_dim=16, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
        attention_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    # full q/k norm, clip_qkv, biases, 8 experts, yarn rope
    "olmoe_clip": (transformers.OlmoeConfig, dict(
        _COMMON, intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0,
        attention_bias=True, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                  original_max_position_embeddings=32))),
}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _make_hf(cls, kwargs, seed):
  """A random HF model in eval mode, eager attention, weights re-drawn so that logits are far from uniform
  (HF's std 0.02 makes tiny models repeat one token) and norms and biases are not trivially 1 and 0."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs), attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        # fan-in is the last axis of every torch weight here (Linear [out, in], fused experts [E, out, in])
        std = 2.0 if name.endswith("mlp.gate.weight") else 1.0
        p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[-1] ** 0.5)
  return model.eval()


def dense_from_hf(cfg: DecoderConfig, sd: dict) -> tuple[dict, dict]:
  """HF state dict (numpy) -> (the on-disk dense tree of the contract, {block: (wi [E, 2F, D], wo [E, D, F])})."""
  t = lambda name: np.ascontiguousarray(sd[name].T)  # noqa: E731  torch [out, in] -> [in, out]
  dense = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"], "blocks": {}}
  if not cfg.tie_word_embeddings:
    dense["lm_head"] = t("lm_head.weight")
  experts = {}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = {n: t(f"{p}self_attn.{n}_proj.weight") for n in "qkvo"}
    for n in "qkvo":
      if f"{p}self_attn.{n}_proj.bias" in sd:
        attn[f"{n}_b"] = sd[f"{p}self_attn.{n}_proj.bias"]
    for n in ("q_norm", "k_norm"):
      if f"{p}self_attn.{n}.weight" in sd:
        attn[n] = sd[f"{p}self_attn.{n}.weight"]
    blk = {"attn_norm": sd[f"{p}input_layernorm.weight"], "attn": attn,
           "ffn_norm": sd[f"{p}post_attention_layernorm.weight"]}
    if f"{p}mlp.gate.weight" in sd:
      blk["router"] = {"w": t(f"{p}mlp.gate.weight")}
      if f"{p}mlp.shared_expert_gate.weight" in sd:
        s = f"{p}mlp.shared_expert."
        wi = np.concatenate([sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]], axis=0)
        blk["shared"] = {"wi": wi.T.copy(), "wo": t(s + "down_proj.weight"),
                         "gate": t(f"{p}mlp.shared_expert_gate.weight")}
      experts[i] = (sd[f"{p}mlp.experts.gate_up_proj"], sd[f"{p}mlp.experts.down_proj"])
    else:
      wi = np.concatenate([sd[f"{p}mlp.gate_proj.weight"], sd[f"{p}mlp.up_proj.weight"]], axis=0)
      blk["mlp"] = {"wi": wi.T.copy(), "wo": t(f"{p}mlp.down_proj.weight")}
    dense["blocks"][str(i)] = blk
  return dense, experts


def build_ours(cfg: DecoderConfig, hf) -> CausalMoE:
  sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  dense, experts = dense_from_hf(cfg, sd)
  model = CausalMoE(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_dense(cfg, dense)))
  nnx.update(model, state)
  for i, (wi, wo) in experts.items():
    model.blocks[i].moe.place_experts(np.arange(cfg.num_experts), wi, wo)
  return model


@pytest.fixture(scope="module")
def pairs():
  out = {}
  for n, (name, (cls, kwargs)) in enumerate(CONFIGS.items()):
    hf = _make_hf(cls, kwargs, seed=n)
    cfg = DecoderConfig.from_hf_dict(hf.config.to_dict())
    out[name] = hf, cfg, build_ours(cfg, hf)
  return out


def _inputs(seed=0, batch=3, length=10):
  """Left-padded ids and mask: row 0 full, rows 1 and 2 with 3 and 6 pads."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, (batch, length))
  mask = np.ones((batch, length), bool)
  mask[1, :3] = False
  mask[2, :6] = False
  ids[~mask] = 0
  return ids.astype(np.int32), mask


def _hf_logits(hf, ids, mask):
  position_ids = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)  # as HF generate
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
              position_ids=torch.tensor(position_ids)).logits.numpy()


def test_configs_cover_what_they_claim(pairs):
  _, mixtral, _ = pairs["mixtral_window"]
  assert mixtral.sliding_window == 5 and mixtral.sliding_layers == (0, 1) and mixtral.norm_topk_prob
  _, qwen2, _ = pairs["qwen2_moe_shared"]
  assert qwen2.sparse_layers == (0, 2) and qwen2.shared_d_ff == 36 and qwen2.attention_bias
  assert qwen2.sliding_layers == (0,) and qwen2.window_of(2) is None
  _, qwen3, _ = pairs["qwen3_moe_tied"]
  assert qwen3.tie_word_embeddings and qwen3.qk_norm == "head" and qwen3.head_dim == 16 and qwen3.output_bias
  _, olmoe, _ = pairs["olmoe_clip"]
  assert olmoe.qk_norm == "full" and olmoe.clip_qkv == 3.0 and olmoe.rope_params["rope_type"] == "yarn"
  for _, cfg, _ in pairs.values():
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.moe_layers == tuple(("decoder", i) for i in cfg.sparse_layers)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_on_a_left_padded_batch(pairs, name):
  hf, _, ours = pairs[name]
  ids, mask = _inputs()
  ref = _hf_logits(hf, ids, mask)
  with jax.default_matmul_precision("highest"):
    got, stats = ours.forward(jnp.asarray(ids), jnp.asarray(mask))
  err = _rel(np.asarray(got)[mask], ref[mask])
  assert err < 1e-5, f"{name}: relative logit error {err:.2e}"
  # every real token makes top_k choices in every MoE layer; padding is left out of the statistics
  _, cfg, _ = pairs[name]
  np.testing.assert_array_equal(np.asarray(stats.wanted).sum(-1), [mask.sum() * cfg.top_k] * cfg.num_moe_layers)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_equals_full_forward(pairs, name):
  _, _, ours = pairs[name]
  ids, mask = _inputs(seed=1, length=14)
  s = 8  # prefill 8 indices, then 6 decode steps (past every sliding window)
  with jax.default_matmul_precision("highest"):
    full, _ = ours.forward(jnp.asarray(ids), jnp.asarray(mask))
    cache = ours.init_cache(ids.shape[0], 16, jnp.float32)
    last, cache, _ = ours.prefill(jnp.asarray(ids[:, :s]), jnp.asarray(mask[:, :s]), cache)
    assert _rel(last, full[:, s - 1]) < 1e-5
    np.testing.assert_array_equal(np.asarray(cache.offset), [0, 3, 6])
    for t in range(s, ids.shape[1]):
      step, cache, _ = ours.decode_step(jnp.asarray(ids[:, t]), jnp.int32(t), cache)
      assert _rel(step, full[:, t]) < 1e-5, f"{name}: position {t}"


def _greedy(model, cfg, ids, mask, steps):
  """Prefill, then greedy decode steps; rows that emitted EOS get pad (as the runtime's decode loop)."""
  b, s = ids.shape
  with jax.default_matmul_precision("highest"):
    cache = model.init_cache(b, s + steps, jnp.float32)
    logits, cache, _ = model.prefill(jnp.asarray(ids), jnp.asarray(mask), cache)
    done = np.zeros((b,), bool)
    out = []
    for t in range(steps):
      nxt = np.where(done, cfg.pad_token_id, np.argmax(np.asarray(logits), axis=-1))
      done |= np.isin(nxt, cfg.eos_token_ids)
      out.append(nxt)
      if t + 1 < steps:
        logits, cache, _ = model.decode_step(jnp.asarray(nxt, jnp.int32), jnp.int32(s + t), cache,
                                             live=jnp.asarray(~done))
  return np.stack(out, axis=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_hf(pairs, name):
  hf, cfg, ours = pairs[name]
  ids, mask = _inputs(seed=2)
  steps = 8
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                      max_new_tokens=steps, do_sample=False,
                      pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_ids[0]).numpy()[:, ids.shape[1]:]
  got = _greedy(ours, cfg, ids, mask, steps)
  assert len(set(ref.ravel().tolist())) > 3, "degenerate reference generation"
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)  # HF stops early once every row has emitted EOS
  assert ref.shape[1] == steps or np.all(got[:, ref.shape[1]:] == cfg.pad_token_id)


# --- rope ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rope_frequencies_match_hf(pairs, name):
  hf, cfg, _ = pairs[name]
  rotary = hf.model.rotary_emb
  inv_freq, scaling = layers.rope_frequencies(cfg)
  np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
  assert scaling == pytest.approx(rotary.attention_scaling, rel=1e-7)


# --- config reading -----------------------------------------------------------------------------------


def test_unknown_model_type_names_the_supported_ones():
  with pytest.raises(ConfigError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
    DecoderConfig.from_hf_dict({"model_type": "deepseek_v3", "hidden_size": 8})


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"type": "longrope", "factor": 2.0}])
def test_unsupported_rope_names_the_supported_ones(pairs, rope):
  hf, _, _ = pairs["mixtral_window"]
  d = hf.config.to_dict()
  d["rope_parameters"] = dict(rope, rope_theta=10000.0)
  with pytest.raises(ConfigError, match="default, linear, llama3, yarn"):
    DecoderConfig.from_hf_dict(d)


def test_legacy_rope_theta_and_rope_scaling_are_read():
  hf = dict(CONFIGS["mixtral_window"][1], model_type="mixtral", rope_theta=5000.0,
            rope_scaling={"type": "linear", "factor": 3.0})
  del hf["rope_parameters"]
  cfg = DecoderConfig.from_hf_dict(hf)
  assert cfg.rope_theta == 5000.0 and cfg.rope_params == {"rope_type": "linear", "factor": 3.0}


def test_qwen_sparse_step_and_mlp_only_layers():
  hf = dict(CONFIGS["qwen2_moe_shared"][1], model_type="qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2,
            mlp_only_layers=[3])
  assert DecoderConfig.from_hf_dict(hf).sparse_layers == (1, 5)


def test_bad_configs_raise_config_error():
  good = DecoderConfig.from_hf_dict(dict(CONFIGS["olmoe_clip"][1], model_type="olmoe")).to_dict()
  for change in ({"num_kv_heads": 3}, {"qk_norm": "group"}, {"top_k": 9}, {"hidden_act": "tanh"},
                 {"sparse_layers": [0, 5]}, {"num_layers": "2"}, {"unknown": 1}):
    with pytest.raises(ConfigError):
      DecoderConfig.from_dict(good | change)


# --- partial residency --------------------------------------------------------------------------------


def test_exact_routing_with_host_banks_equals_full_residency(pairs):
  """Two of four experts resident per layer, misses served from the banks (in `cfg.moe_layers` order):
  the logits of the fully resident model; masked routing changes them."""
  hf, cfg, full = pairs["qwen2_moe_shared"]
  sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  _, experts = dense_from_hf(cfg, sd)
  ids, mask = _inputs(seed=3)
  want, _ = full.forward(jnp.asarray(ids), jnp.asarray(mask))
  banks = tuple((jnp.asarray(experts[i][0]), jnp.asarray(experts[i][1])) for _, i in cfg.moe_layers)
  for routing in ("exact", "masked"):
    model = CausalMoE(cfg, slots_per_layer=[2] * cfg.num_moe_layers, routing=routing, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(full, nnx.Param))
    for i, (wi, wo) in experts.items():
      model.blocks[i].moe.place_experts([3, 1], wi, wo)
    got, stats = model.forward(jnp.asarray(ids), jnp.asarray(mask), banks if routing == "exact" else None)
    assert int(np.asarray(stats.misses).sum()) > 0
    if routing == "exact":
      assert _rel(np.asarray(got)[mask], np.asarray(want)[mask]) < 1e-5
    else:
      assert _rel(np.asarray(got)[mask], np.asarray(want)[mask]) > 1e-3


def test_bfloat16_model_runs_and_stays_close(pairs):
  hf, cfg, full = pairs["qwen3_moe_tied"]
  model = CausalMoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  state = nnx.state(full, nnx.Param)
  nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float32 if a.ndim == 2 and a.shape[-1] == cfg.num_experts
                                                    else jnp.bfloat16), state))
  for i in cfg.sparse_layers:
    src = full.blocks[i].moe
    model.blocks[i].moe.place_experts(np.arange(cfg.num_experts), np.asarray(src.wi[...]), np.asarray(src.wo[...]))
  ids, mask = _inputs()
  want, _ = full.forward(jnp.asarray(ids), jnp.asarray(mask))
  got, _ = model.forward(jnp.asarray(ids), jnp.asarray(mask))
  assert got.dtype == jnp.float32 and model.blocks[0].attn.q[...].dtype == jnp.bfloat16
  # bfloat16 may flip a near-tied top-k choice at a token, so compare on average
  err = np.abs(np.asarray(got) - np.asarray(want))[mask]
  assert np.mean(err) < 0.02 * np.max(np.abs(np.asarray(want)[mask]))
  cache = model.init_cache(ids.shape[0], ids.shape[1] + 2)
  assert cache.k[0].dtype == jnp.bfloat16
  _, cache, _ = model.prefill(jnp.asarray(ids), jnp.asarray(mask), cache)
  step, cache, _ = model.decode_step(jnp.asarray(ids[:, -1]), jnp.int32(ids.shape[1]), cache)
  assert step.dtype == jnp.float32 and cache.k[0].dtype == jnp.bfloat16
