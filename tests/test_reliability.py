"""Reliability and safety: bad inputs, interrupted work, property tests, and what the code may never do.

Each test here is a row of the README's Reliability table. Bad inputs already covered elsewhere
(tests/test_convert.py, tests/test_cli.py, tests/test_budget_planner.py) are not repeated; the table
points at those tests too.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_fixtures as hf
import swapmoe_jax
from checkpoints_conv import ConversionError, convert
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax import generate
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import planner as planner_lib
from swapmoe_jax.serving.budget import BudgetError, parse_budget
from swapmoe_jax.serving.engine import InputError
from test_budget_planner import configs
from test_swap_concurrency import assert_slots_agree, half_budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny HF SwitchTransformers folder (safetensors, with the test tokenizer)."""
  return hf.save_hf(hf.make_hf_model(seed=0), tmp_path_factory.mktemp("rel") / "hf", tokenizer=True)


@pytest.fixture(scope="module")
def folder(converted_tiny):
  return converted_tiny()[1]


@pytest.fixture(scope="module")
def full(folder):
  return swapmoe_jax.load(folder)


def _one_line(e: BaseException) -> str:
  message = str(e)
  assert "\n" not in message, message
  return message


# --- bad inputs: the converter ---------------------------------------------------------------------


class _RunsCode:
  """Unpickling this would create `marker`: a stand-in for code a malicious `.bin` runs on load."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


def _bin_with(folder, state) -> None:
  os.remove(os.path.join(folder, "model.safetensors"))
  torch.save(state, os.path.join(folder, "pytorch_model.bin"))


def _t5_state_dict():
  import transformers

  cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)
  return transformers.T5ForConditionalGeneration(cfg).state_dict()


# name: (edit of a copy of the HF folder, given the test's tmp_path; error pattern)
BAD_CONVERTER_INPUTS = {
    "config.json not JSON": (lambda d, _: open(os.path.join(d, "config.json"), "w").write("{'not': json"),
                             r"cannot parse .*config\.json"),
    "config.json a list": (lambda d, _: open(os.path.join(d, "config.json"), "w").write("[1, 2]"),
                           r"malformed .*config\.json: expected a JSON object"),
    "config.json wrong type": (lambda d, _: _edit_json(d, "config.json", d_model="wide"),
                               r"config\.json: malformed config: invalid literal for int"),
    ".bin of a T5 model": (lambda d, _: _bin_with(d, _t5_state_dict()),
                           r"unknown tensor .* in .*pytorch_model\.bin: not a SwitchTransformers weight"),
    ".bin holding a list": (lambda d, _: _bin_with(d, [torch.zeros(2)]), r"pytorch_model\.bin holds a list, "
                            r"not a state dict"),
    ".bin holding a string": (lambda d, _: _bin_with(d, {"shared.weight": "x"}),
                              r"shared\.weight in .*pytorch_model\.bin is a str, not a tensor"),
    ".bin that runs code": (lambda d, tmp: _bin_with(d, {"shared.weight": _RunsCode(tmp / "pwned")}),
                            r"cannot read .*pytorch_model\.bin \(UnpicklingError: Weights only load failed"),
}


def _edit_json(folder, name, **changes):
  path = os.path.join(folder, name)
  with open(path) as f:
    d = json.load(f)
  with open(path, "w") as f:
    json.dump(d | changes, f)


@pytest.mark.parametrize("case", list(BAD_CONVERTER_INPUTS))
def test_converter_refuses(hf_folder, tmp_path, case):
  edit, pattern = BAD_CONVERTER_INPUTS[case]
  src = shutil.copytree(hf_folder, tmp_path / "src")
  edit(src, tmp_path)
  with pytest.raises(ConversionError, match=pattern) as info:
    convert(src, tmp_path / "out", progress=False)
  _one_line(info.value)
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary folder
  assert not (tmp_path / "pwned").exists()  # weights_only=True: the pickle's code never ran


# --- bad inputs: load() and the checkpoint metadata ------------------------------------------------


def _largest_file(folder, sub):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(folder, sub)) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate_expert_data(d):
  path = _largest_file(d, "experts")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _more_experts(d):
  meta = json.load(open(os.path.join(d, ckpt.METADATA_FILE)))
  meta["config"]["num_experts"] = 6
  meta["expert_norms"] = [[1.0] * 6 for _ in meta["expert_norms"]]
  json.dump(meta, open(os.path.join(d, ckpt.METADATA_FILE), "w"))


def _fewer_experts(d):
  meta = json.load(open(os.path.join(d, ckpt.METADATA_FILE)))
  meta["config"]["num_experts"] = 2
  meta["expert_norms"] = [[1.0] * 2 for _ in meta["expert_norms"]]
  json.dump(meta, open(os.path.join(d, ckpt.METADATA_FILE), "w"))


def _edit_config(**changes):
  def edit(d):
    meta = json.load(open(os.path.join(d, ckpt.METADATA_FILE)))
    meta["config"] |= changes
    json.dump(meta, open(os.path.join(d, ckpt.METADATA_FILE), "w"))
  return edit


def _edit_meta(**changes):
  return lambda d: _edit_json(d, ckpt.METADATA_FILE, **changes)


# name: (edit of a copy of a converted folder, error pattern)
BAD_CHECKPOINTS = {
    "newer format version": (_edit_meta(format_version=ckpt.FORMAT_VERSION + 1),
                             r"written by a newer swapmoe_jax \(format_version 2, this one reads up to 1\)"),
    "format version 0": (_edit_meta(format_version=0), r"'format_version' must be >= 1, got 0"),
    "config field of the wrong type": (_edit_config(d_model="32"),
                                       r"bad config in .*swapmoe\.json: config field d_model must be of type "
                                       r"int, got '32'"),
    "config field a bool": (_edit_config(expert_capacity=True), r"config field expert_capacity must be of type int"),
    "negative size": (_edit_config(d_ff=-48), r"bad config in .*: d_ff must be positive, got -48"),
    "pad id outside the vocabulary": (_edit_config(pad_token_id=96),
                                      r"pad_token_id must be in \[0, vocab_size=96\), got 96"),
    "NaN expert norm": (_edit_meta(expert_norms=[[float("nan")] * 4] * 4),
                        r"'expert_norms' in .*swapmoe\.json must be finite and >= 0"),
    "hf_config not an object": (_edit_meta(hf_config=[1]), r"'hf_config' should be dict"),
    "file list escaping the folder": (_edit_meta(files={"../../etc/passwd": 1}),
                                      r"file '\.\./\.\./etc/passwd' is outside the checkpoint folder"),
    "more experts in the config than on disk": (_more_experts,
                                                r"expert count mismatch: .*experts/encoder_000 holds 4 experts, but "
                                                r"the config in swapmoe\.json says num_experts=6"),
    "fewer experts in the config than on disk": (_fewer_experts,
                                                 r"expert count mismatch: .*experts/encoder_000 holds 4 experts, but "
                                                 r"the config in swapmoe\.json says num_experts=2"),
    "truncated expert file": (_truncate_expert_data,
                              r"incomplete checkpoint .*: experts/.* has \d+ bytes, swapmoe\.json says \d+"),
    "missing Orbax file": (lambda d: os.remove(os.path.join(d, "dense", "_METADATA")),
                           r"incomplete checkpoint .*: dense/_METADATA is missing"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_load_refuses_a_damaged_checkpoint(folder, tmp_path, case):
  edit, pattern = BAD_CHECKPOINTS[case]
  damaged = shutil.copytree(folder, tmp_path / "ckpt")
  edit(damaged)
  with pytest.raises(ckpt.CheckpointError, match=pattern) as info:
    swapmoe_jax.load(damaged)
  _one_line(info.value)


def test_checkpoint_lists_every_file_with_its_size(folder):
  meta = json.load(open(os.path.join(folder, ckpt.METADATA_FILE)))
  on_disk = {os.path.relpath(os.path.join(r, f), folder): os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(folder) for f in fs if f != ckpt.METADATA_FILE}
  assert meta[ckpt.FILES_KEY] == on_disk
  assert any(name.startswith("experts/") for name in on_disk) and "dense/_METADATA" in on_disk


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(policy="bogus"), ValueError, r"unknown policy 'bogus'; supported: full, swapmoe, pruned, lru, lfu"),
    (dict(planner="greedy", budget="1TiB"), ValueError, r"unknown planner 'greedy'; supported: auto, uniform, calibrated"),
    (dict(policy="lru"), ValueError, r"policy 'lru' needs a budget"),
    (dict(budget="-2GiB"), BudgetError, r"budget '-2GiB' is negative"),
    (dict(budget="lots"), BudgetError, r"malformed budget 'lots'"),
    (dict(budget="1KiB"), BudgetError, r"below the minimum .* \(\d+ bytes\)"),
    (dict(budget="1TiB", max_batch_size=1.5), InputError, r"max_batch_size must be an integer >= 1, got 1\.5"),
    (dict(budget="1TiB", max_new_tokens=0), InputError, r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(dtype="float16"), ValueError, r"dtype must be one of \['bfloat16', 'float32'\], got 'float16'"),
], ids=["unknown policy", "unknown planner", "policy without budget", "negative budget", "malformed budget",
        "budget too small", "fractional batch", "zero new tokens", "unknown dtype"])
def test_load_refuses(folder, kwargs, error, pattern):
  with pytest.raises(error, match=pattern) as info:
    swapmoe_jax.load(folder, **kwargs)
  _one_line(info.value)


def test_budget_larger_than_the_model_keeps_every_expert_and_never_swaps(folder):
  model = swapmoe_jax.load(folder, budget="1TiB", policy="lru", max_source_len=16)
  cfg = model.config
  assert model.plan.slots_per_layer == (cfg.num_experts,) * cfg.num_moe_layers
  assert model.plan.max_swaps_per_step == 0 and model.residency.executor is None
  assert "no swaps" in model.plan.reason and "of 1.00 TiB" in model.plan.reason


def test_budget_larger_than_the_device_is_refused(folder, monkeypatch):
  monkeypatch.setattr(budget_lib, "device_memory_bytes", lambda device: 50 * 2**20)
  with pytest.raises(BudgetError, match=r"the plan needs .* on the device, but .* has 50\.00 MiB .*smaller budget"):
    swapmoe_jax.load(folder, budget="1TiB", policy="swapmoe")


# --- bad inputs: the model's __call__ and generate -------------------------------------------------

IDS = np.array([[5, 17, 33, 1]])
BAD_CALLS = {
    "ragged nested lists": (lambda m: m.generate([[5, 6], [7]]), r"input_ids must be a rectangular array"),
    "float ids": (lambda m: m.generate(IDS.astype(np.float32)), r"input_ids must be an integer array, got dtype "
                  r"float32"),
    "bool ids": (lambda m: m.generate(IDS > 3), r"must be an integer array, got dtype bool"),
    "string ids": (lambda m: m.generate(["5 17 33"]), r"must be an integer array, got dtype <U"),
    "empty prompt": (lambda m: m.generate(np.zeros((1, 0), np.int32)), r"length >= 1, got \(1, 0\)"),
    "empty batch": (lambda m: m.generate(np.zeros((0, 4), np.int32)), r"batch, length >= 1, got \(0, 4\)"),
    "3-D ids": (lambda m: m.generate(IDS[None]), r"shape \[batch, length\] .*got \(1, 1, 4\)"),
    "id above the vocabulary": (lambda m: m.generate(IDS + 95), r"outside the vocabulary \[0, 96\): min 96, max 128"),
    "negative id": (lambda m: m.generate(-IDS), r"outside the vocabulary \[0, 96\): min -33"),
    "decoder id above the vocabulary": (lambda m: m(IDS, decoder_input_ids=[[0, 96]]),
                                        r"decoder_input_ids has token ids outside the vocabulary"),
    "mask of the wrong shape": (lambda m: m.generate(IDS, np.ones((1, 3))), r"attention_mask has shape \(1, 3\), "
                                r"expected \(1, 4\)"),
    "mask of fractions": (lambda m: m.generate(IDS, np.full((1, 4), 0.5)), r"attention_mask must hold booleans or "
                          r"0/1"),
    "mask hiding a whole row": (lambda m: m.generate(np.repeat(IDS, 2, 0), [[1, 1, 0, 0], [0, 0, 0, 0]]),
                                r"attention_mask masks every position of row 1"),
    "fractional max_new_tokens": (lambda m: m.generate(IDS, max_new_tokens=2.5),
                                  r"max_new_tokens must be an integer >= 1, got 2\.5"),
    "max_new_tokens as text": (lambda m: m.generate(IDS, max_new_tokens="8"), r"max_new_tokens must be an integer"),
    "max_new_tokens beyond int32 positions": (lambda m: m.generate(IDS, max_new_tokens=10**12),
                                              r"max_new_tokens must be below 2147483584"),
    "a cache larger than the device": (lambda m: m.generate(np.ones((64, 4), np.int32), max_new_tokens=2**31 - 128),
                                       r"needs a decoder cache of .* more than the device's"),
    "NaN temperature": (lambda m: m.generate(IDS, temperature=float("nan")),
                        r"temperature must be a finite number >= 0, got nan"),
    "fractional top_k": (lambda m: m.generate(IDS, temperature=1.0, top_k=2.5), r"top_k must be an integer >= 0"),
    "seed as text": (lambda m: m.generate(IDS, seed="x"), r"seed must be an integer, got 'x'"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_model_refuses(full, case):
  call, pattern = BAD_CALLS[case]
  with pytest.raises(ValueError, match=pattern) as info:
    call(full)
  _one_line(info.value)


def test_a_request_beyond_the_planned_shape_is_refused_before_the_device(folder):
  model = swapmoe_jax.load(folder, budget="1TiB", max_batch_size=1, max_source_len=8, max_new_tokens=8)
  for ids, n in ((np.ones((1, 9), np.int32), 4), (np.ones((2, 4), np.int32), 4), (IDS, 65)):
    with pytest.raises(InputError, match=r"exceeds what the budget was planned for"):
      model.generate(ids, max_new_tokens=n)


# --- bad inputs: the command line ------------------------------------------------------------------


@pytest.fixture()
def no_tokenizer(converted_tiny, tmp_path, monkeypatch):
  monkeypatch.setenv("SWAPMOE_CACHE", str(tmp_path / "cache"))
  return converted_tiny(tokenizer=False)[1]


@pytest.mark.parametrize("prompt, pattern", [
    ("5 17 96", r"token ids must be in \[0, 96\), got '5 17 96'"),
    ("5 -1", r"token ids must be in \[0, 96\)"),
    ("hello there", r"this checkpoint has no tokenizer: give the prompt as space-separated token ids"),
], ids=["id above the vocabulary", "negative id", "text without a tokenizer"])
def test_cli_refuses_bad_token_ids(no_tokenizer, capsys, prompt, pattern):
  rc = generate.main(["--model", no_tokenizer, "--prompt", prompt, "--quiet"])
  out, err = capsys.readouterr()
  assert rc == 2 and not out
  assert len(err.splitlines()) == 1 and re.match("error: " + pattern, err), err


def test_cli_refuses_a_cache_larger_than_the_device(no_tokenizer, capsys):
  rc = generate.main(["--model", no_tokenizer, "--prompt", "5 17", "--max-new-tokens", str(2**30),
                      "--batch-size", "4096", "--quiet"])
  out, err = capsys.readouterr()
  assert rc == 2 and not out
  assert len(err.splitlines()) == 1 and re.match(r"error: the plan needs .* on the device, but", err), err


# --- interrupted work ------------------------------------------------------------------------------


def _convert_cmd(src, out):
  return [sys.executable, "-m", "checkpoints_conv", "--hf", str(src), "--out", str(out), "--quiet", "--overwrite"]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _assert_absent_or_complete(out, reference):
  """`out` is absent, or a checkpoint whose every array equals the reference conversion's."""
  if not os.path.lexists(out):
    return "absent"
  meta = ckpt.read_metadata(out)  # raises on anything partial
  want = ckpt.read_metadata(reference)
  for got, ref in zip(ckpt.restore_all_experts(meta), ckpt.restore_all_experts(want)):
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
  dense, ref_dense = ckpt.restore_dense(meta), ckpt.restore_dense(want)
  import jax

  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(ref_dense), strict=True):
    np.testing.assert_array_equal(a, b)
  return "complete"


def test_conversion_killed_at_random_points_leaves_nothing_partial(hf_folder, tmp_path):
  """SIGKILL (no cleanup runs) at random delays over the whole run, start-up included, and at random
  delays after the temporary folder appeared (mid-write); every run replaces the output (--overwrite),
  so kills also land between the two renames of an overwrite."""
  reference = convert(hf_folder, tmp_path / "reference", progress=False)
  root = tmp_path / "runs"
  root.mkdir()
  out = root / "model"
  t0 = time.perf_counter()
  subprocess.run(_convert_cmd(hf_folder, out), env=_env(), check=True, timeout=300)
  whole = time.perf_counter() - t0
  shutil.rmtree(out)
  rng = random.Random(8)
  seen = []
  for n in range(6):
    proc = subprocess.Popen(_convert_cmd(hf_folder, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if n % 2 == 0:  # anywhere in the run
      time.sleep(rng.uniform(0, whole))
    else:  # once writing has begun
      deadline = time.perf_counter() + 120
      while not any(".tmp-" in name for name in os.listdir(root)) and time.perf_counter() < deadline:
        if proc.poll() is not None:
          break
        time.sleep(0.002)
      time.sleep(rng.uniform(0, 0.1))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen.append(_assert_absent_or_complete(out, reference))
  leftovers = [name for name in os.listdir(root) if name != "model"]
  assert leftovers, "no kill landed while the temporary folder was being written"
  # The rerun succeeds, replaces whatever is there, and removes the killed runs' temporary folders.
  subprocess.run(_convert_cmd(hf_folder, out), env=_env(), check=True, timeout=300)
  assert _assert_absent_or_complete(out, reference) == "complete"
  assert os.listdir(root) == ["model"], f"left behind: {os.listdir(root)} (after the kills: {leftovers})"
  print(f"kills: {seen}; temporary folders left by the kills: {len(leftovers)}")


@pytest.fixture()
def hub(hf_folder, tmp_path, monkeypatch):
  """A fake hub: `snapshot_download` serves `hf_folder`; the swapmoe cache is private to the test."""
  import huggingface_hub

  calls = []

  def snapshot_download(repo_id, revision=None, allow_patterns=()):
    calls.append(repo_id)
    return os.fspath(hf_folder)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setenv("SWAPMOE_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  return calls


def _remove(rel):
  return lambda d: os.remove(os.path.join(d, rel))


HALF_FILLED = {
    "truncated expert data": _truncate_expert_data,
    "a lost Orbax file": _remove("dense/_METADATA"),
    "no metadata yet": _remove(ckpt.METADATA_FILE),
    "an empty folder": lambda d: [shutil.rmtree(d), os.mkdir(d)],
    "a file in its place": lambda d: [shutil.rmtree(d), open(d, "w").close()],
}


@pytest.mark.parametrize("case", list(HALF_FILLED))
def test_half_filled_hub_cache_is_detected_and_redone(hub, folder, case):
  first = generate.resolve_model("someone/tiny-switch", quiet=True)
  assert first == os.path.join(os.environ["SWAPMOE_CACHE"], "models", "someone_tiny-switch")
  assert generate.resolve_model("someone/tiny-switch", quiet=True) == first and hub == ["someone/tiny-switch"]
  HALF_FILLED[case](first)
  assert not ckpt.is_complete(first)
  assert generate.resolve_model("someone/tiny-switch", quiet=True) == first
  assert hub == ["someone/tiny-switch"] * 2  # converted again
  assert _assert_absent_or_complete(first, folder) == "complete"


def test_half_filled_demo_cache_is_redone(tmp_path):
  from swapmoe_jax.builtin.demo import demo_checkpoint

  out = demo_checkpoint(cache_dir=tmp_path / "demo", progress=False)
  _truncate_expert_data(out)
  assert not ckpt.is_complete(out)
  assert demo_checkpoint(cache_dir=tmp_path / "demo", progress=False) == out
  assert ckpt.is_complete(out)


def test_exception_inside_generate_leaves_the_model_consistent(folder, full):
  """A stream callback raising mid-request (as Ctrl-C would) between swaps: the next requests of an
  exact policy still equal the full model, and the slots hold what the controller says."""
  cfg = full.config
  model = swapmoe_jax.load(folder, budget=half_budget(cfg, batch=1, src_len=8, tgt_len=64), policy="lru",
                           max_source_len=8, update_every=1)

  def interrupt(step, tokens):
    if step == 3:
      raise KeyboardInterrupt

  rng = np.random.default_rng(0)
  for _ in range(3):
    ids = rng.integers(2, 96, (1, 8))
    with pytest.raises(KeyboardInterrupt):
      model.generate(ids, max_new_tokens=12, stream=interrupt)
    ids = rng.integers(2, 96, (1, 8))
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=12), full.generate(ids, max_new_tokens=12))
  assert model.stats.summary()["experts_swapped"] > 0
  assert_slots_agree(model)



# --- safety ----------------------------------------------------------------------------------------

SHIPPED = ("swapmoe_jax", "checkpoints_conv", "benchmarks")
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
  """What the shipped code may never do, found in the syntax tree: `torch.load` without
  `weights_only=True`, any pickle-family import, `numpy.load(allow_pickle=True)`, `trust_remote_code`
  (as a keyword or a string key), and `eval` / `exec`."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    where = f"{filename}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
      found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in _PICKLE_MODULES]
    elif isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
      owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
      kw = {k.arg: k.value for k in node.keywords}
      if name == "load" and owner == "torch":
        safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if not safe:
          found.append(f"{where}: torch.load without weights_only=True")
      if name == "load" and owner in ("np", "numpy") and "allow_pickle" in kw:
        found.append(f"{where}: numpy.load with allow_pickle")
      if name in ("eval", "exec") and isinstance(func, ast.Name):
        found.append(f"{where}: {name}()")
      if "trust_remote_code" in kw:
        found.append(f"{where}: trust_remote_code=")
    elif isinstance(node, ast.Constant) and node.value == "trust_remote_code":
      found.append(f"{where}: 'trust_remote_code'")
  return found


def test_scanner_finds_what_it_looks_for():
  bad = ("import pickle\nfrom dill import loads\nimport torch\nimport numpy as np\n"
         "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
         "AutoModel.from_pretrained(p, trust_remote_code=True)\nf(**{'trust_remote_code': True})\neval('1')\n")
  found = unsafe_calls(bad)
  assert len(found) == 8, found
  assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True, mmap=True)\nnp.load(p)\n") == []


def test_shipped_code_never_unpickles_unsafely_nor_trusts_remote_code():
  files = [os.path.join(r, f) for pkg in SHIPPED for r, _, fs in os.walk(os.path.join(REPO, pkg))
           for f in fs if f.endswith(".py")]
  assert len(files) > 20
  found = [hit for path in files for hit in unsafe_calls(open(path).read(), os.path.relpath(path, REPO))]
  assert found == []
  loads = [path for path in files if "torch.load(" in open(path).read()]
  assert loads == [os.path.join(REPO, "checkpoints_conv", "sources.py")]  # the scan saw the one reader


@FAST
@given(st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["..", ".", "/", "~", "a", "B-1", "\\", ":", "\x00", " ", "%2e", "…"]),
             max_size=10).map("".join),
))
def test_cache_folder_names_cannot_leave_the_cache(source):
  root = os.path.join(os.sep, "cache", "models")
  try:
    name = generate.cache_name(source)
  except generate.UsageError:
    return
  assert name not in ("", ".", "..") and os.sep not in name and "\x00" not in name
  assert os.path.dirname(os.path.normpath(os.path.join(root, name))) == root


@pytest.mark.parametrize("model", ["../../etc", "/etc/passwd-model", "a/../../b", "..", "~/.ssh/x"])
def test_hub_ids_that_look_like_paths_stay_inside_the_cache(hub, tmp_path, capsys, model):
  rc = generate.main(["--model", model, "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert hub == []  # never sent to the hub
  written = sorted(os.path.relpath(os.path.join(r, f), tmp_path) for r, ds, fs in os.walk(tmp_path) for f in ds + fs)
  assert written in ([], ["cache"], ["cache", os.path.join("cache", "models")]), written  # nothing converted


# --- properties: the budget parser and the planner -------------------------------------------------

_UNIT_BYTES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30,
               "KB": 10**3, "MB": 10**6, "GB": 10**9}


@FAST
@given(n=st.integers(1, 2**40), unit=st.sampled_from(sorted(_UNIT_BYTES)), upper=st.booleans(),
       pad=st.sampled_from(["", " ", "  "]))
def test_parse_budget_reads_every_spelling_of_a_size(n, unit, upper, pad):
  text = f"{pad}{n}{pad}{unit.upper() if upper else unit}{pad}"
  assert parse_budget(text).resolve(1) == n * _UNIT_BYTES[unit]
  assert parse_budget(str(parse_budget(text))) == parse_budget(text)


@FAST
@given(hundredths=st.integers(1, 10_000), unit=st.sampled_from(["MiB", "GiB", "GB"]))
def test_parse_budget_floors_fractions_and_reads_percentages(hundredths, unit):
  text = f"{hundredths // 100}.{hundredths % 100:02d}"
  assert parse_budget(text + unit).resolve(1) == hundredths * _UNIT_BYTES[unit] // 100
  assert parse_budget(text + "%").percent == pytest.approx(hundredths / 100)


@FAST
@given(st.one_of(st.none(), st.booleans(), st.lists(st.integers()), st.dictionaries(st.text(), st.integers()),
                 st.binary(), st.complex_numbers(), st.floats(max_value=0), st.integers(max_value=0),
                 st.text(alphabet="xyzq!@#-+", min_size=1), st.integers(1, 999).map(lambda n: f"{n} parsecs")))
def test_parse_budget_rejects_junk_with_a_value_error(value):
  with pytest.raises(ValueError) as info:
    parse_budget(value)
  assert isinstance(info.value, BudgetError) and "budget" in str(info.value)
  _one_line(info.value)


_MINIMUM = re.compile(r"below the minimum [\d.]+ \w+ \((\d+) bytes\)")


@FAST
@given(config=configs, dtype_bytes=st.sampled_from([2, 4]), batch=st.integers(1, 4), src=st.integers(1, 64),
       tgt=st.integers(1, 128), swaps=st.integers(1, 3), short=st.integers(1, 10**6))
def test_too_small_a_budget_names_a_minimum_that_plans(config, dtype_bytes, batch, src, tgt, swaps, short):
  shape = (dtype_bytes, batch, src, tgt)
  minimum = budget_lib.min_budget_bytes(config, *shape, swaps)
  full = budget_lib.memory_breakdown(config, dtype_bytes, [config.num_experts] * config.num_moe_layers, batch, src,
                                    tgt, 0).total
  if full < minimum:  # everything fits without staging below the swapping minimum: nothing to refuse
    return
  with pytest.raises(BudgetError) as info:
    planner_lib.plan_uniform(config, max(1, minimum - short), *shape, max_swaps_per_step=swaps)
  stated = int(_MINIMUM.search(str(info.value)).group(1))
  assert stated == minimum
  importance = np.ones((config.num_moe_layers, config.num_experts))
  for plan in (planner_lib.plan_uniform(config, stated, *shape, max_swaps_per_step=swaps),
               planner_lib.plan_calibrated(config, stated, *shape, importance, max_swaps_per_step=swaps)):
    assert plan.breakdown.total <= stated
    assert min(plan.slots_per_layer) >= 1


# --- long runs -------------------------------------------------------------------------------------


def test_telemetry_keeps_a_bounded_history_and_exact_totals():
  from swapmoe_jax.serving.stats import StepRecord, Telemetry

  t = Telemetry("swapmoe", max_records=3)
  for step in range(10):
    t.add(StepRecord(step, hits=step, misses=1))
  assert [r.step for r in t.records] == [7, 8, 9]
  assert t.totals["hits"] == 45 and t.totals["misses"] == 10 and t.steps == 10
  assert json.loads(t.to_json(records=True))["records"][0]["step"] == 7


def _soak():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import soak

  return soak


def test_soak_verdict_fails_on_recompiles_memory_growth_and_mismatches():
  import argparse

  soak = _soak()
  args = argparse.Namespace(rss_tolerance_mib=16.0, rss_slope_tolerance_mib=0.5, device_tolerance_mib=16.0)

  class _Model:
    plan = type("P", (), {"slots_per_layer": (4, 4)})()
    config = type("C", (), {"num_experts": 8})()
    stats = type("S", (), {"summary": staticmethod(lambda: {"experts_swapped": 9})})()

  models = soak.Models(_Model(), None, None, {}, 1, "test")
  device = type("D", (), {"device_kind": "cpu", "platform": "cpu"})()

  def rows(compiles=lambda i: 30, rss=lambda i: 600 * MiB, dev=lambda i: None):
    return [dict(kind="checkpoint", step=1000 * (i + 1), requests=i, elapsed_s=i, compiles=compiles(i),
                 rss_bytes=rss(i), device_bytes_in_use=dev(i), device_peak_bytes=None, warmup=i == 0)
            for i in range(11)]

  def verdict(r, bad=None):
    out = soak.summarize(args, "swapmoe", r, r[0], bad or dict(twin=0, full=0, fresh=0, slots=0), models, device, 0)
    return out["ok"], " ".join(out["failures"])

  assert verdict(rows()) == (True, "")
  assert verdict(rows(compiles=lambda i: 30 + (i == 10)))[1] == "1 compilations after the warm-up"
  assert "RSS still climbs" in verdict(rows(rss=lambda i: 600 * MiB + i * MiB // 5))[1]  # 2 MiB / 10k steps
  assert "RSS grew 20.0 MiB" in verdict(rows(rss=lambda i: 600 * MiB + (i > 0) * 20 * MiB))[1]
  assert "device memory grew" in verdict(rows(dev=lambda i: 100 * MiB + i * 2 * MiB))[1]
  assert verdict(rows(), dict(twin=1, full=0, fresh=0, slots=0)) == (False, "twin: 1 mismatching checks")

