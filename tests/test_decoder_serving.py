"""Decoder-only families served end to end: an HF model saved with `save_pretrained`, converted by
`checkpoints_conv`, loaded by `swapmoe_jax.load` under every policy, against HF PyTorch.

What is checked: logits of a left-padded batch and greedy tokens against HF `generate`; exact policies
(lru, lfu) at one resident expert per layer give `full`'s tokens; swaps through `generate` never
recompile; budgets are planned within their bytes; the CLI runs a plain and a chat prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import swapmoe_jax
from checkpoints_conv import convert
from swapmoe_jax.serving import decode
from tests import hf_fixtures

PROMPTS = [[5, 17, 33, 9, 41, 8, 12], [23, 7, 64, 3]]  # two rows of different lengths: left padding


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
  """model_type -> (the HF model, its converted folder), converted once per module."""
  made = {}

  def get(model_type: str):
    if model_type not in made:
      root = tmp_path_factory.mktemp(model_type)
      model = hf_fixtures.make_decoder_model(model_type, seed=3)
      model.save_pretrained(root / "hf")
      hf_fixtures.add_chat_tokenizer(root / "hf")
      made[model_type] = model, convert(root / "hf", root / "converted", dtype="float32", progress=False)
    return made[model_type]

  return get


def _batch(pad_id: int, left: bool):
  width = max(map(len, PROMPTS))
  ids = np.full((len(PROMPTS), width), pad_id, np.int64)
  mask = np.zeros((len(PROMPTS), width), np.int64)
  for r, row in enumerate(PROMPTS):
    sl = slice(width - len(row), width) if left else slice(0, len(row))
    ids[r, sl], mask[r, sl] = row, 1
  return ids, mask


def _hf_generate(model, n: int) -> np.ndarray:
  ids, mask = _batch(model.config.pad_token_id, left=True)
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=model.config.pad_token_id)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("model_type", hf_fixtures.DECODER_FAMILIES)
def test_logits_and_greedy_tokens_equal_hf(family_folder, model_type):
  hf, folder = family_folder(model_type)
  model = swapmoe_jax.load(folder)
  assert isinstance(model, swapmoe_jax.CausalLM)
  ids, mask = _batch(hf.config.pad_token_id, left=True)
  with torch.no_grad():
    want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(ids, mask))
  valid = mask.astype(bool)
  err = np.abs(got - want)[valid].max() / np.abs(want[valid]).max()
  assert err < 1e-5, f"{model_type}: logits differ from HF by {err:.2e} (relative to the largest)"
  # min_new_tokens keeps HF from stopping at EOS, so ask ours for tokens past EOS the same way: compare
  # row by row up to each row's first EOS, where both must agree.
  want_tokens = _hf_generate(hf, 8)
  got_tokens = model.generate(ids, mask, max_new_tokens=8)
  eos = set(np.atleast_1d(hf.config.eos_token_id).tolist())
  for r in range(len(PROMPTS)):
    row = [int(t) for t in got_tokens[r]]
    n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    assert row[:n] == want_tokens[r, :n].tolist(), f"{model_type} row {r}"


def test_right_padded_batch_generates_as_left_padded(family_folder):
  """HF needs left padding for a decoder-only batch; `generate` realigns a right-padded one itself."""
  _, folder = family_folder("mixtral")
  model = swapmoe_jax.load(folder)
  left = model.generate(*_batch(0, left=True), max_new_tokens=6)
  right = model.generate(*_batch(0, left=False), max_new_tokens=6)
  np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_exact_policies_at_one_expert_equal_full(family_folder, policy):
  hf, folder = family_folder("qwen2_moe")
  ids, mask = _batch(hf.config.pad_token_id, left=True)
  full = swapmoe_jax.load(folder)
  want_logits = np.asarray(full(ids, mask))
  want = full.generate(ids, mask, max_new_tokens=10, steps_per_call=4)
  model = swapmoe_jax.load(folder, experts=1, policy=policy, max_batch_size=2, max_source_len=16,
                           max_new_tokens=10)
  assert model.plan.slots_per_layer == (1,) * model.config.num_moe_layers
  np.testing.assert_allclose(np.asarray(model(ids, mask)), want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=10, steps_per_call=4), want)
  assert model.stats.totals["misses"] > 0, "one resident expert of four: the exact path served misses"


def test_swapmoe_swaps_through_generate_without_recompiling(family_folder):
  hf, folder = family_folder("olmoe")
  model = swapmoe_jax.load(folder, experts=2, policy="swapmoe", max_batch_size=2, max_source_len=16,
                           max_new_tokens=16, update_every=1, max_swaps_per_step=2)
  ids, mask = _batch(hf.config.pad_token_id, left=True)
  model.generate(ids, mask, max_new_tokens=16, steps_per_call=2)  # compiles every program once
  sizes = decode.prefill._cache_size(), decode.decode_steps._cache_size()
  swapped = model.stats.totals["experts_swapped"]
  rng = np.random.default_rng(0)
  for _ in range(3):  # other prompts move importance, so the controller swaps
    other = rng.integers(3, hf.config.vocab_size, size=ids.shape)
    model.generate(other, mask, max_new_tokens=16, steps_per_call=2)
  assert model.stats.totals["experts_swapped"] > swapped
  assert (decode.prefill._cache_size(), decode.decode_steps._cache_size()) == sizes, "a swap recompiled"


def test_prefill_refit_is_for_encoder_decoder_models(family_folder):
  _, folder = family_folder("olmoe")
  with pytest.raises(ValueError, match="encoder-decoder models"):
    swapmoe_jax.load(folder, experts=2, policy="swapmoe", prefill_refit=0.1, max_source_len=16, max_new_tokens=16)


def test_budget_plans_hold_their_bytes(family_folder):
  _, folder = family_folder("mixtral")
  full = swapmoe_jax.load(folder)
  for k in (1, 2, 3):
    budget = swapmoe_jax.experts_budget(folder, k, max_batch_size=2, max_source_len=20, max_new_tokens=8)
    model = swapmoe_jax.load(folder, budget=budget, policy="pruned", max_batch_size=2, max_source_len=20,
                             max_new_tokens=8)
    assert model.plan.slots_per_layer == (k,) * full.config.num_moe_layers
    assert model.plan.breakdown.total <= budget
  with pytest.raises(ValueError, match="below the minimum"):
    swapmoe_jax.load(folder, budget=budget // 4, policy="swapmoe")


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "swapmoe_jax.generate", *args], capture_output=True, text=True,
                        timeout=600)


def test_cli_plain_and_chat_prompts(family_folder):
  _, folder = family_folder("qwen3_moe")
  plain = _cli("--model", str(folder), "--prompt", "hello world", "--max-new-tokens", "4", "--json",
               "--experts", "2")
  assert plain.returncode == 0, plain.stderr
  chat = _cli("--model", str(folder), "--prompt", "hello world", "--chat", "--max-new-tokens", "4", "--json")
  assert chat.returncode == 0, chat.stderr
  plain_ids, chat_ids = json.loads(plain.stdout)["prompt_ids"][0], json.loads(chat.stdout)["prompt_ids"][0]
  assert len(chat_ids) > len(plain_ids), "the chat template wraps the prompt"
  assert len(json.loads(chat.stdout)["token_ids"][0]) >= 1


def test_request_end_drain_defaults_by_architecture(family_folder):
  """`load(swap_between_requests=None)`: decoder-only families leave the controller's remaining moves to
  the next request's calls (on an H200 the drain cost 2.56x `full` per request on the OLMoE-1B-7B shape
  at 33 %, 1.07x without); Switch drains, and under swapmoe also chooses each request's residents from
  its prompt (prompt residency). An explicit value wins."""
  from swapmoe_jax import default_checkpoint

  _, folder = family_folder("olmoe")
  kw = dict(experts=2, policy="swapmoe", max_batch_size=2, max_source_len=16, max_new_tokens=16)
  assert swapmoe_jax.load(folder, **kw).residency.swap_between_requests is False
  assert swapmoe_jax.load(folder, swap_between_requests=True, **kw).residency.swap_between_requests is True
  assert swapmoe_jax.load(folder, **kw).residency.prompt_residency is False
  switch = swapmoe_jax.load(default_checkpoint(), experts=3, policy="swapmoe").residency
  assert switch.prompt_residency is True and switch.swap_between_requests is True
  old = swapmoe_jax.load(default_checkpoint(), experts=3, policy="swapmoe", prompt_residency=False).residency
  assert old.prompt_residency is False and old.swap_between_requests is True
  for policy in ("selective", "fallback"):
    other = swapmoe_jax.load(default_checkpoint(), experts=3, policy=policy).residency
    assert other.prompt_residency is False and other.swap_between_requests is True
  assert swapmoe_jax.load(default_checkpoint(), experts=3, policy="swapmoe",
                          swap_between_requests=False).residency.swap_between_requests is False
