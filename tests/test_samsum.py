"""The SAMSum protocol's machinery, offline: pairs, budgets by K, and the Rouge-2 sweep on a tiny model."""

import sys
import types

import pytest

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.eval import rouge, samsum
from swapmoe_jax.serving.loader import experts_budget

pytestmark = pytest.mark.usefixtures("xla_compile_cache")
SHAPE = dict(max_new_tokens=6, max_source_len=16, batch_size=2)


@pytest.fixture(scope="module")
def folder(converted_tiny):
  return converted_tiny(seed=3)[1]


@pytest.fixture(scope="module")
def pairs():
  # Two batches of 2, the second with a filler row; tokens (test tokenizer, max_source_len 16): 25 and 35
  # are truncated, 14 is padded to 16.
  sources = ["translate: the quick brown fox", "summarize: a b", "translate: hello world and more words here"]
  return [samsum.Pair(s, "the quick brown fox jumps") for s in sources]


@pytest.fixture(scope="module")
def rows(folder, pairs):
  return samsum.rouge_sweep(folder, pairs, policies=["lru", "swapmoe"], experts_per_layer=[2], **SHAPE)


def test_rows_are_full_then_each_policy_at_each_budget(folder, rows):
  cfg = ckpt.read_metadata(folder).config
  shape = dict(max_batch_size=2, max_source_len=16, max_new_tokens=6)
  # K per layer for each policy: lru's bytes also hold the experts its steps copy from host memory.
  lru, swapmoe = (experts_budget(folder, 2, policy=p, **shape) for p in ("lru", "swapmoe"))
  assert lru > swapmoe
  assert [(r.policy, r.budget_bytes) for r in rows] == [("full", None), ("lru", lru), ("swapmoe", swapmoe)]
  assert rows[0].slots_per_layer == (cfg.num_experts,) * cfg.num_moe_layers
  assert rows[1].slots_per_layer == rows[2].slots_per_layer == (2,) * cfg.num_moe_layers


@pytest.fixture(scope="module")
def alone(folder, pairs):
  """Each source generated alone by the full model, unpadded (truncated to max_source_len, EOS kept):
  the texts and the tokens up to and including EOS."""
  model = swapmoe_jax.load(folder)
  eos = set(model.config.eos_token_ids)
  texts, tokens = [], 0
  for p in pairs:
    ids = model.tokenizer(p.source, truncation=True, max_length=16, return_tensors="np").input_ids
    out = model.generate(ids, max_new_tokens=6)[0]
    texts.append(model.tokenizer.decode(out, skip_special_tokens=True))
    ends = [i for i, t in enumerate(out) if int(t) in eos]
    tokens += ends[0] + 1 if ends else len(out)
  return texts, tokens


def test_predictions_equal_generating_each_source_alone(rows, alone):
  """Batching, bucket padding and filler rows change no output; the exact policy equals full."""
  assert list(rows[0].predictions) == alone[0]
  assert rows[1].predictions == rows[0].predictions and rows[1].redirect_rate == 0 and rows[1].misses > 0
  assert rows[2].redirect_rate > 0  # masked routing with 2 of 4 experts redirects some tokens


def test_scores_and_token_counts(pairs, rows, alone):
  for r in rows:
    assert r.rouge2 == pytest.approx(rouge.rouge2(r.predictions, [p.reference for p in pairs]))
    assert r.ms_per_token > 0 and set(r.summary()) == set(r.__dataclass_fields__) - {"predictions"}
  assert rows[0].tokens == alone[1]


def test_budgets_as_load_takes_them(folder, pairs):
  budget = experts_budget(folder, 2, max_batch_size=2, max_source_len=16, max_new_tokens=6)
  rows = samsum.rouge_sweep(folder, pairs[:1], policies=["pruned"], budgets=[f"{budget}"], include_full=False,
                            **SHAPE)
  assert [(r.policy, r.budget_bytes, r.experts_swapped) for r in rows] == [("pruned", budget, 0)]
  assert set(rows[0].slots_per_layer) == {2}


@pytest.mark.parametrize("kw, message", [
    (dict(), "exactly one of budgets= and experts_per_layer="),
    (dict(budgets=["1GiB"], experts_per_layer=[1]), "exactly one of"),
    (dict(experts_per_layer=[9]), r"experts_per_layer must be in \[1, 4\], got 9"),
])
def test_bad_sweep_arguments(folder, pairs, kw, message):
  with pytest.raises(ValueError, match=message):
    samsum.rouge_sweep(folder, pairs, **kw)
  with pytest.raises(ValueError, match="no pairs"):
    samsum.rouge_sweep(folder, [], experts_per_layer=[1])


def test_samsum_pairs_prefix_dialogues_and_take_the_first_rows(monkeypatch):
  calls = []

  class FakeSplit(list):
    def select(self, indices):
      return FakeSplit(self[i] for i in indices)

  def load_dataset(name, split, revision):
    calls.append((name, split, revision))
    return FakeSplit({"dialogue": f"A: hi {i}", "summary": f"A greets {i}."} for i in range(5))

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  got = samsum.samsum_pairs("validation", limit=2)
  assert got == [samsum.Pair("summarize: A: hi 0", "A greets 0."), samsum.Pair("summarize: A: hi 1", "A greets 1.")]
  assert calls == [(samsum.DATASET, "validation", samsum.DATASET_REVISION)]
  assert len(samsum.samsum_pairs(limit=50)) == 5
  with pytest.raises(ValueError, match="limit must be >= 1"):
    samsum.samsum_pairs(limit=0)


def test_samsum_pairs_without_datasets_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
  with pytest.raises(ImportError, match="pip install datasets"):
    samsum.samsum_pairs()


def test_task_pairs_are_the_tasks_prompts_and_answers():
  from swapmoe_jax.builtin.tasks import make_examples

  examples = make_examples(5, seed=2)
  assert samsum.task_pairs(5, seed=2) == [samsum.Pair(e.prompt, e.answer) for e in examples]


def test_table_has_a_line_per_row_with_its_figures(rows):
  lines = samsum.format_table(rows).splitlines()
  assert len(lines) == 1 + len(rows) and lines[0].split()[:3] == ["policy", "budget", "K"]
  for line, r in zip(lines[1:], rows):
    cells = line.split()
    assert cells[0] == r.policy and f"{100 * r.rouge2:.2f}" in cells and f"{r.ms_per_token:.2f}" in cells


def test_plot_draws_each_policy_against_the_budget_in_mib(rows):
  import matplotlib

  matplotlib.use("Agg")
  fig = samsum.plot_rows(rows)
  rouge_ax, speed_ax = fig.axes
  lines = {line.get_label(): line for line in rouge_ax.get_lines()}
  assert set(lines) == {"full (no budget)", "lru", "swapmoe"}
  assert list(lines["swapmoe"].get_xdata()) == [rows[2].budget_bytes / 2**20]
  assert list(lines["swapmoe"].get_ydata()) == [100 * rows[2].rouge2]
  assert list(lines["full (no budget)"].get_ydata()) == [100 * rows[0].rouge2] * 2
  assert [line.get_ydata()[0] for line in speed_ax.get_lines()][1:] == [rows[1].ms_per_token, rows[2].ms_per_token]
