"""The command line `python -m swapmoe_jax.generate`, on the built-in (random) demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax import generate
from swapmoe_jax.builtin.demo import demo_checkpoint
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import decode

PROMPT = "translate: the quick brown fox"
SRC_LEN, NEW_TOKENS = 32, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The converted demo checkpoint, built once for this module in a temporary folder."""
  return demo_checkpoint(cache_dir=tmp_path_factory.mktemp("cli") / "demo", progress=False)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_compile_cache):
  """Every CLI run loads the model anew, which retraces its programs; with a persistent XLA cache, runs
  after the first (and the subprocess) skip XLA compiles."""
  return xla_compile_cache


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  """Nothing a test runs may write into the user's ~/.cache."""
  monkeypatch.setenv("SWAPMOE_CACHE", str(tmp_path_factory.getbasetemp() / "swapmoe-cache"))


def _main(capsys, *argv):
  rc = generate.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _args(demo, *extra):
  return ("--model", demo, "--prompt", PROMPT, "--max-source-len", str(SRC_LEN), "--max-new-tokens",
          str(NEW_TOKENS), *extra)


_JSON_RUNS: dict = {}


def _json_run(capsys, demo, *extra):
  """The parsed --json output of a greedy run (cached: each run loads and compiles the model)."""
  if extra not in _JSON_RUNS:
    rc, out, err = _main(capsys, *_args(demo, "--json", *extra))
    assert rc == 0, err
    _JSON_RUNS[extra] = json.loads(out)
  return _JSON_RUNS[extra]


def test_streams_text_and_reports_stats(capsys, demo):
  rc, out, err = _main(capsys, *_args(demo))
  assert rc == 0, err
  assert out.strip(), "no generated text on stdout"
  assert "error" not in err
  stats = [line for line in err.splitlines() if "tokens/s" in line]
  assert len(stats) == 1, err
  assert "prefill" in stats[0] and "peak device memory" in stats[0] and "policy full" in stats[0]


def test_json_has_ids_texts_and_stats(capsys, demo):
  res = _json_run(capsys, demo, "--policy", "full")
  assert res["prompts"] == [PROMPT]
  ids = res["token_ids"][0]
  assert 1 <= len(ids) <= NEW_TOKENS and all(isinstance(t, int) for t in ids)
  assert res["prompt_ids"][0][-1] == 1  # the tokenizer appended EOS
  assert isinstance(res["outputs"][0], str)
  stats = res["stats"]
  assert stats["generated_tokens"] == len(ids)
  for key in ("tokens_per_s", "prefill_s", "peak_device_bytes", "plan_bytes", "redirect_rate", "hit_rate",
              "experts_swapped", "bytes_swapped", "misses"):
    assert key in stats
  assert stats["policy"] == "full" and stats["budget_bytes"] is None
  assert stats["slots_per_layer"] == [8, 8, 8, 8]


def test_lru_under_budget_matches_full(capsys, demo):
  cfg = ckpt.read_metadata(demo).config
  half = [cfg.num_experts // 2] * cfg.num_moe_layers
  # lru copies its misses from host memory inside the step: the plan holds those copies too.
  budget = budget_lib.memory_breakdown(cfg, 4, half, batch=1, src_len=SRC_LEN,
                                       tgt_len=decode.cache_length(NEW_TOKENS), staging_slots=2,
                                       bank_reads=budget_lib.bank_read_experts(cfg, 4, 1)).total
  full = _json_run(capsys, demo, "--policy", "full")
  lru = _json_run(capsys, demo, "--policy", "lru", "--budget", str(budget))
  assert lru["stats"]["budget_bytes"] == budget
  assert lru["stats"]["plan_bytes"] <= budget
  assert lru["stats"]["slots_per_layer"] == half
  assert lru["stats"]["misses"] > 0, "the budget should have left wanted experts out"
  assert lru["token_ids"] == full["token_ids"]
  assert lru["outputs"] == full["outputs"]


def test_every_staging_gives_the_same_output(capsys, demo):
  cfg = ckpt.read_metadata(demo).config
  half = [cfg.num_experts // 2] * cfg.num_moe_layers
  budget = budget_lib.memory_breakdown(cfg, 4, half, batch=1, src_len=SRC_LEN,
                                       tgt_len=decode.cache_length(NEW_TOKENS), staging_slots=2).total
  runs = {s: _json_run(capsys, demo, "--policy", "swapmoe", "--budget", str(budget), "--staging", s)
          for s in ("transfer", "gather", "pageable")}
  assert runs["gather"]["token_ids"] == runs["transfer"]["token_ids"] == runs["pageable"]["token_ids"]
  assert runs["gather"]["stats"]["slots_per_layer"] == half


def _bad_inputs(tmp):
  long_prompt = " ".join(["fox"] * 3 * SRC_LEN)
  return {
      "empty prompt": ["--prompt", "   "],
      "no such model folder": ["--model", str(tmp / "no-such-model")],
      "malformed budget": ["--budget", "lots"],
      "budget below the minimum": ["--budget", "1KiB"],
      "prompt too long": ["--prompt", long_prompt],
      "unknown policy": ["--policy", "bogus"],
      "max new tokens 0": ["--max-new-tokens", "0"],
      "batch size 0": ["--batch-size", "0"],
      "missing input file": ["--input-file", str(tmp / "prompts.txt")],
      "unknown staging": ["--staging", "dma"],
      "malformed planner": ["--experts", "5", "--planner", "6,x"],
      "planner slots over the budget": ["--experts", "3", "--planner", "4,4,3,3"],
      "planner slots for too few layers": ["--experts", "5", "--planner", "6,6"],
  }


@pytest.mark.parametrize("case", ["empty prompt", "no such model folder", "malformed budget",
                                  "budget below the minimum", "prompt too long", "unknown policy",
                                  "max new tokens 0", "batch size 0", "missing input file", "unknown staging",
                                  "malformed planner", "planner slots over the budget",
                                  "planner slots for too few layers"])
def test_bad_input_is_one_error_line(capsys, demo, tmp_path, case):
  base = ["--model", demo, "--prompt", PROMPT, "--max-source-len", str(SRC_LEN), "--quiet"]
  rc, out, err = _main(capsys, *base, *_bad_inputs(tmp_path)[case])
  lines = err.strip().splitlines()
  assert rc == 2, (case, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
  assert "Traceback" not in err and not out
  if case == "budget below the minimum":
    assert "minimum" in lines[0]
  if case == "prompt too long":
    assert "--max-source-len 32" in lines[0]
  if case == "planner slots over the budget":
    assert "(14 experts) do not fit" in lines[0] and "holds 12" in lines[0]


def test_planner_as_k_per_layer(capsys, demo):
  """--planner 6,6,4,4 beside --experts 5: those slots, at the bytes of 5 per layer."""
  res = _json_run(capsys, demo, "--experts", "5", "--planner", "6,6,4,4")
  uniform = _json_run(capsys, demo, "--experts", "5", "--planner", "uniform")
  assert res["stats"]["slots_per_layer"] == [6, 6, 4, 4] and uniform["stats"]["slots_per_layer"] == [5] * 4
  assert res["stats"]["plan_bytes"] == uniform["stats"]["plan_bytes"]


def test_unreachable_hub_is_one_error_line(capsys, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  rc, out, err = _main(capsys, "--model", "nobody-here/no-such-switch-model", "--quiet")
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  assert "no-such-switch-model" in lines[0]


def test_cache_name_stays_inside_the_cache():
  assert generate.cache_name("google/switch-base-8") == "google_switch-base-8"
  assert generate.cache_name("a/../../etc") == "a_.._.._etc"
  assert generate.cache_name("x/y z:w") == "x_y_z_w"
  with pytest.raises(generate.UsageError):
    generate.cache_name("...")


def test_module_entry_point(demo, tmp_path, compile_cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", SWAPMOE_CACHE=str(tmp_path), JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  # The prompt and source length of the in-process runs: the same programs, found in the compile cache.
  cmd = [sys.executable, "-m", "swapmoe_jax.generate", "--model", demo, "--max-new-tokens", "3",
         "--prompt", PROMPT, "--max-source-len", str(SRC_LEN)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip()
  stats = [line for line in proc.stderr.splitlines() if line.startswith("stats:")]
  assert len(stats) == 1 and "tokens/s" in stats[0], proc.stderr[-2000:]
