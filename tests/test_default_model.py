"""The built-in default model: its tasks, its training script (a tiny run), its export, its accuracy,
and `swapmoe_jax.evaluate` on it."""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest
import torch
import transformers

from swapmoe_jax.builtin import tasks, train
from swapmoe_jax.builtin.demo import default_checkpoint
from swapmoe_jax.eval import evaluate
from swapmoe_jax.serving.loader import experts_budget, load


# --- tasks ---------------------------------------------------------------------------------------------
def _solve(prompt: str) -> str:
  """Each family's answer, recomputed from the prompt text by a second implementation."""
  family, body = prompt.split(": ", 1)
  items = body.split(" ")
  nums = [int(x) for x in items if x.isdigit()]
  if family == "reverse":
    return " ".join(reversed(items))
  if family == "sort":
    return " ".join(map(str, sorted(nums)))
  if family == "add":
    return str(nums[0] + nums[1])
  if family == "upper":
    return body.upper()
  if family == "count":
    return str(len(items))
  if family == "dedupe":
    seen = []
    for w in items:
      if w not in seen:
        seen.append(w)
    return " ".join(seen)
  if family == "shift":
    return " ".join("abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(c) + 1) % 26] for c in items)
  if family == "convert":
    v, src, _, dst = items
    factor = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000, ("l", "ml"): 1000}
    return str(int(v) * factor[(src, dst)])
  if family == "max":
    return str(max(nums))
  if family == "sum":
    return str(sum(nums))
  raise AssertionError(family)


def test_every_family_answers_exactly_and_splits_train_from_held_out():
  held = tasks.make_examples(500, seed=1)
  train_ex = tasks.training_examples(500, random.Random(1))
  assert {e.family for e in held} == set(tasks.FAMILIES) and len(tasks.FAMILIES) >= 8
  for e in held + train_ex:
    assert e.prompt.startswith(e.family + ": ")
    assert _solve(e.prompt) == e.answer, e
  assert all(tasks.is_held_out(e.prompt) for e in held)
  assert not any(tasks.is_held_out(e.prompt) for e in train_ex)
  hand = tasks.hand_typed_examples()
  assert {e.family for e in hand} == set(tasks.FAMILIES)
  for e in hand + held[:100]:
    assert tasks.is_held_out(e.prompt) and tasks.solve(e.prompt) == _solve(e.prompt) == e.answer, e
  # What people type is in the training distribution too (single digits, one item, repeats), so that
  # held-out prompts like the hand-typed ones are not out of distribution.
  sorts = [e.prompt for e in train_ex + tasks.training_examples(2000, random.Random(2)) if e.family == "sort"]
  assert any(re.fullmatch(r"sort: \d( \d){2,}", p) for p in sorts)
  assert any(re.fullmatch(r"sort: \d+", p) for p in sorts)
  assert any(len(p.split()) != len(set(p.split())) for p in sorts)


def test_request_streams_arrive_in_runs_or_shuffled():
  runs = tasks.request_stream(40, "runs", seed=2, run_length=8)
  shuffled = tasks.request_stream(40, "shuffled", seed=2, run_length=8)
  fams = [e.family for e in runs]
  assert all(len(set(fams[i:i + 8])) == 1 for i in range(0, 40, 8))
  assert sorted(map(repr, runs)) == sorted(map(repr, shuffled))  # the same requests, reordered
  changes = sum(a.family != b.family for a, b in zip(shuffled, shuffled[1:]))
  assert changes > 10
  with pytest.raises(ValueError, match="stream kind"):
    tasks.request_stream(4, "sorted")


# --- the shipped model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model():
  return load(default_checkpoint(), max_batch_size=16, max_source_len=32, max_new_tokens=24)


def test_shipped_model_is_trained_and_recorded():
  folder = default_checkpoint()
  with open(os.path.join(folder, "TRAINING.json")) as f:
    record = json.load(f)
  from swapmoe_jax import checkpoint as ckpt
  cfg = ckpt.read_metadata(folder).config
  assert cfg.num_experts >= 16 and cfg.num_moe_layers >= 2
  size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(folder) for n in ns)
  assert size < 12 * 2**20, size  # a few MB, inside the package
  assert record["heldout_exact_match"]["overall"] > 0
  assert set(record["heldout_exact_match"]["per_family"]) == set(tasks.FAMILIES)


def test_shipped_model_answers_held_out_prompts(default_model):
  """Greedy exact match at full residency on 80 held-out prompts (not the training record's seed)."""
  examples = tasks.make_examples(80, seed=123)
  tok = default_model.tokenizer
  hits = 0
  for k in range(0, len(examples), 16):
    chunk = examples[k:k + 16]
    enc = tok([e.prompt for e in chunk], padding="max_length", max_length=32, return_tensors="np")
    out = default_model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24)
    hits += sum(t.strip() == e.answer for t, e in zip(tok.batch_decode(out, skip_special_tokens=True), chunk))
  assert hits / len(examples) >= 0.97, hits  # 99.8% on the 1,000 prompts of TRAINING.json


def test_shipped_model_answers_what_people_type(default_model):
  """The held-out hand-typed prompts (short lists of single digits, repeats, one item) at full residency;
  TRAINING.json records 58 of 60 (two sums of five equal digits are wrong)."""
  hand = tasks.hand_typed_examples()
  tok = default_model.tokenizer
  got = []
  for k in range(0, len(hand), 16):
    chunk = [e.prompt for e in hand[k:k + 16]]
    chunk += [chunk[0]] * (16 - len(chunk))
    enc = tok(chunk, padding="max_length", max_length=32, return_tensors="np")
    got += tok.batch_decode(default_model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24),
                            skip_special_tokens=True)
  wrong = {e.prompt: t.strip() for e, t in zip(hand, got) if t.strip() != e.answer}
  assert len(wrong) <= 2, wrong
  assert not any(p.startswith("sort:") for p in wrong), wrong


def test_training_tokenization_equals_the_hf_tokenizer(default_model):
  """train.batch_arrays tokenizes with sentencepiece directly; the served model uses the HF tokenizer."""
  from swapmoe_jax import checkpoint as ckpt

  spiece = os.path.join(ckpt.read_metadata(default_checkpoint()).tokenizer_dir, "spiece.model")
  examples = tasks.make_examples(200, seed=4)
  s = train.Settings()
  arrays = train.batch_arrays(spiece, examples, s)
  tok = default_model.tokenizer
  ref = tok([e.prompt for e in examples], padding="max_length", max_length=s.src_len, return_tensors="np")
  np.testing.assert_array_equal(arrays["ids"], ref["input_ids"])
  ref = tok([e.answer for e in examples], padding="max_length", max_length=s.tgt_len, return_tensors="np")
  np.testing.assert_array_equal(arrays["labels"], ref["input_ids"])


# --- the training script -----------------------------------------------------------------------------------
def test_training_script_runs_exports_and_converts(tmp_path):
  """A tiny run end to end: loss falls, the HF export loads in transformers and matches the converted
  checkpoint served by swapmoe_jax (so export, rules and conversion agree)."""
  out, hf = tmp_path / "model", tmp_path / "hf"
  rc = train.main(["--out", str(out), "--tiny", "--steps", "30", "--pool-size", "3000", "--eval-examples", "10",
                   "--keep-hf", str(hf), "--peak-lr", "3e-3", "--warmup-steps", "5"])
  assert rc == 0
  record = json.loads((out / "TRAINING.json").read_text())
  assert record["steps_run"] == 30 and record["settings"]["seed"] == 0
  hist = record["history"]
  assert hist[-1]["ce"] < 5.0  # from ln(V) ~ 5.2 at the start
  hf_model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(hf)).eval()
  ours = load(str(out))
  ids = np.asarray([[5, 9, 17, 33, 1]], np.int32)
  dec = np.asarray([[0, 7, 12, 3]], np.int32)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                   decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids, None, dec)), ref, atol=2e-4, rtol=2e-4)
  assert main_refuses_existing(out)


def main_refuses_existing(out) -> bool:
  return train.main(["--out", str(out), "--tiny", "--steps", "1"]) == 2


# --- evaluation -----------------------------------------------------------------------------------------------
def test_evaluate_grid_on_the_default_model(tmp_path, capsys):
  rc = evaluate.main(["--budgets", "25", "--policies", "full,swapmoe,pruned,lfu", "--gates", "original",
                      "--streams", "runs", "--requests", "12", "--out", str(tmp_path)])
  assert rc == 0
  data = json.loads((tmp_path / "evaluation.json").read_text())
  rows = {r["policy"]: r for r in data["rows"]}
  assert set(rows) == {"full", "swapmoe", "pruned", "lfu"}
  assert rows["full"]["agreement"] == 1.0 and rows["full"]["tf_kl"] == 0.0
  # the exact policy computes what full computes, with 4 of 16 experts resident
  assert rows["lfu"]["slots"] == 4 and rows["lfu"]["miss_rate"] > 0
  assert rows["lfu"]["exact_match"] == rows["full"]["exact_match"] and rows["lfu"]["agreement"] == 1.0
  assert rows["lfu"]["tf_kl"] < 1e-6
  # masked policies redirect tokens; swapmoe swaps, pruned never does
  assert rows["swapmoe"]["experts_swapped"] > 0 and rows["pruned"]["experts_swapped"] == 0
  assert rows["pruned"]["redirect_rate"] > 0 and rows["pruned"]["tf_kl"] > 0
  # paired differences on the same requests, from the per-request scores
  for name, r in rows.items():
    assert len(r["correct"]) == 12 and r["exact_match"] == pytest.approx(np.mean(r["correct"]))
    if name != "full":
      d = r["vs_full"]
      assert d["diff"] == pytest.approx(r["exact_match"] - rows["full"]["exact_match"])
      assert d["low"] <= d["diff"] <= d["high"] and d["n"] == 12
  assert rows["lfu"]["vs_full"] == dict(diff=0.0, low=0.0, high=0.0, n=12, a_only=0, b_only=0)
  assert rows["swapmoe"]["vs_pruned"]["diff"] == pytest.approx(rows["swapmoe"]["exact_match"]
                                                              - rows["pruned"]["exact_match"])
  assert rows["full"]["vs_full"] is None and rows["pruned"]["vs_pruned"] is None and rows["lfu"]["vs_pruned"] is None
  # the intervals resample distinct prompts, and each row says how many its requests hold
  distinct = len({e.prompt for e in tasks.request_stream(12, "runs", seed=0)})
  assert all(r["prompts"] == distinct for r in rows.values())
  md = (tmp_path / "evaluation.md").read_text()
  assert len(re.findall(r"^\| runs \|", md, re.M)) == 4
  assert "EM − pruned [95% CI]" in md and f"12 requests, {distinct} distinct prompts" in md
  assert (tmp_path / "evaluation.png").stat().st_size > 10_000


def test_evaluate_takes_resident_experts(tmp_path, capsys):
  rc = evaluate.main(["--experts", "2,3", "--policies", "full,pruned", "--streams", "shuffled", "--requests", "4",
                      "--out", str(tmp_path)])
  assert rc == 0
  rows = json.loads((tmp_path / "evaluation.json").read_text())["rows"]
  assert [(r["policy"], r["gate"], r["slots"]) for r in rows] == [
      ("full", "-", 16), ("pruned", "original", 2), ("pruned", "renormalized", 2),
      ("pruned", "original", 3), ("pruned", "renormalized", 3)]
  budget = experts_budget(default_checkpoint(), 3, max_source_len=evaluate.SRC_LEN,
                          max_new_tokens=evaluate.NEW_TOKENS)
  assert rows[-1]["budget_bytes"] == budget and rows[-1]["expert_pct"] == 18.8


@pytest.mark.parametrize("args, message", [
    (["--budgets", "0"], "percentages in (0, 100]"),
    (["--policies", "swapmoe,best"], "unknown policy"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--experts", "0,3"], "experts must be resident experts per layer in [1, 16]"),
])
def test_evaluate_rejects_bad_arguments(args, message, capsys, tmp_path):
  assert evaluate.main(args + ["--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]


# --- the command line on the built-in model ------------------------------------------------------------------
def test_cli_answers_with_the_built_in_model(capsys):
  """The README's first command (minus the install): the built-in model, swapmoe at 5 of 16 experts."""
  from swapmoe_jax import generate

  rc = generate.main(["--policy", "swapmoe", "--experts", "5", "--prompt", "sort: 7 3 9 1 4"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert out.strip() == "1 3 4 7 9"
  assert "built-in model" in err
  stats = [line for line in err.splitlines() if line.startswith("stats:")]
  assert len(stats) == 1 and "policy swapmoe" in stats[0] and "tokens/s" in stats[0]
  from swapmoe_jax.serving.budget import format_bytes

  assert f"of budget {format_bytes(experts_budget(default_checkpoint(), 5, max_new_tokens=32))}" in stats[0]


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "sort: 1 2", "--budget", "1MiB"], "minimum"),
    (["--prompt", "sort: 1 2", "--policy", "best"], "policy"),
    (["--prompt", "sort: 1 2", "--budget", "lots"], "budget"),
])
def test_cli_bad_input_on_the_built_in_model(args, message, capsys):
  from swapmoe_jax import generate

  rc = generate.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err[-1].startswith("error:") and message in err[-1], err
