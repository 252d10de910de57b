"""The paper's SAMSum protocol: a Switch checkpoint summarises dialogues under memory budgets, scored by
Rouge-2 against the reference summaries (SwapMoE, arXiv 2308.15030, §5 and Table 2).

  pairs = samsum_pairs("test", limit=100)                    # needs `pip install datasets` and the network
  folder = resolve_model("google/switch-base-8")             # swapmoe_jax.generate: converted once, cached
  rows = rouge_sweep(folder, pairs, experts_per_layer=[1, 2, 4, 8], policies=["swapmoe", "pruned"])

Offline, `task_pairs` gives (prompt, answer) pairs of the built-in model's synthetic tasks, so the same
sweep runs on `swapmoe_jax.default_checkpoint()` with no network (what the notebook's small mode and CI do).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence


PROMPT_PREFIX = "summarize: "  # T5's summarisation prefix, as in the paper
DATASET = "Samsung/samsum"
SOURCE_BUCKET = 64  # sources are padded to a multiple of this many tokens: few compiled shapes
# The Parquet conversion of the dataset: its main branch holds a loading script and a .7z archive, which
# `datasets` >= 4 no longer runs. Not fetched in this project (no network); pass revision="main" with an
# older `datasets` (and py7zr) if this reference disappears.
DATASET_REVISION = "refs/pr/7"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One input text for the model and the reference its output is scored against."""

  source: str
  reference: str


@dataclasses.dataclass(frozen=True)
class SweepRow:
  """One (policy, budget) point of a sweep.

  budget_bytes is None for "full" without a budget; slots_per_layer: K_l planned per MoE layer.
  ms_per_token: wall time of the timed generate calls over the tokens they produced (every row's tokens
  up to and including EOS; the first token of a call includes its encoder pass).
  """

  policy: str
  budget_bytes: int | None
  slots_per_layer: tuple[int, ...]
  rouge2: float
  ms_per_token: float
  tokens: int
  redirect_rate: float
  misses: int
  experts_swapped: int
  predictions: tuple[str, ...]

  def summary(self) -> dict:
    """The row without its predictions, for tables."""
    out = dataclasses.asdict(self)
    del out["predictions"]
    return out


def samsum_pairs(split: str = "test", limit: int | None = None, *, dataset: str = DATASET,
                 revision: str = DATASET_REVISION) -> list[Pair]:
  """SAMSum dialogues as ("summarize: " + dialogue, summary) pairs, in the dataset's order.

  Needs the `datasets` package (not a dependency of swapmoe_jax) and access to the Hugging Face hub.
  """
  try:
    import datasets
  except ImportError:
    raise ImportError("reading SAMSum needs the `datasets` package: pip install datasets") from None
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  rows = datasets.load_dataset(dataset, split=split, revision=revision)
  if limit is not None:
    rows = rows.select(range(min(limit, len(rows))))
  return [Pair(PROMPT_PREFIX + r["dialogue"], r["summary"]) for r in rows]


def task_pairs(n: int, seed: int = 0) -> list[Pair]:
  """(prompt, answer) pairs of the built-in model's synthetic tasks (`swapmoe_jax.builtin.tasks`): offline data."""
  from swapmoe_jax.builtin.tasks import make_examples

  return [Pair(e.prompt, e.answer) for e in make_examples(n, seed=seed)]


def rouge_sweep(folder: str | os.PathLike, pairs: Sequence[Pair], *, policies: Sequence[str] = ("swapmoe",),
                experts_per_layer: Sequence[int] | None = None, budgets: Sequence | None = None,
                include_full: bool = True, max_new_tokens: int = 64, max_source_len: int = 512,
                batch_size: int = 1, gate_mode: str = "original", dtype: str | None = None,
                progress=None) -> list[SweepRow]:
  """Rouge-2 and ms/token of a checkpoint over `pairs`, per policy and budget (greedy decoding).

  Args:
    folder: a converted checkpoint (`swapmoe_jax.generate.resolve_model` converts a hub id once).
    pairs: the sources and references.
    policies: residency policies to run under each budget ("swapmoe", "pruned", "lru", "lfu").
    experts_per_layer: budgets given as K experts per MoE layer ("K/E", as `load` takes it: each
      policy's plan holds exactly K per layer at this request shape, `lru`, `lfu` and `selective` in a
      few more bytes, for the experts their steps copy from host memory; `loader.experts_budget`), or
    budgets: budgets as `load` takes them ("4GiB", "40%", bytes). Exactly one of the two.
    include_full: also one row of policy "full" without a budget (the reference).
    max_new_tokens, max_source_len, batch_size: the request shape the budgets are planned for.
    gate_mode, dtype: as for `load`.
    progress: optional callable(str) told which point starts (e.g. `print`).

  Each point loads the model afresh and makes one untimed warm-up call on the first batch (it compiles
  the encoder and the decode step); its routing counts in the row's telemetry.
  """
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.eval import rouge
  from swapmoe_jax.eval.requests import make_requests, run_stream
  from swapmoe_jax.serving.loader import load

  if not pairs:
    raise ValueError("no pairs to evaluate")
  if (budgets is None) == (experts_per_layer is None):
    raise ValueError("give exactly one of budgets= and experts_per_layer=")
  shape = dict(max_batch_size=batch_size, max_source_len=max_source_len, max_new_tokens=max_new_tokens)
  if budgets is None:
    num_experts = ckpt.read_metadata(folder).config.num_experts
    for k in experts_per_layer:  # before any point runs
      if not 1 <= int(k) <= num_experts:
        raise ValueError(f"experts_per_layer must be in [1, {num_experts}], got {k}")
    budgets = [f"{int(k)}/{num_experts}" for k in experts_per_layer]
  points = [("full", None)] if include_full else []
  for b in budgets:
    points.extend((policy, b) for policy in policies)
  references = [p.reference for p in pairs]
  rows = []
  for policy, budget in points:
    if progress is not None:
      progress(f"{policy} budget={budget}")
    model = load(folder, budget=budget, policy=policy, gate_mode=gate_mode, dtype=dtype, **shape)
    if model.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer; text pairs need one")
    requests = make_requests(model.tokenizer, [(p.source, p.reference) for p in pairs], src_len=max_source_len,
                             tgt_len=max_new_tokens, bucket=SOURCE_BUCKET)
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    run_stream(model, requests[:batch_size], **kw)  # warm-up: compiles
    res = run_stream(model, requests, timed_from=0, **kw)
    predictions = model.tokenizer.batch_decode(res["outputs"], skip_special_tokens=True)
    stats = model.stats.summary() if model.stats is not None else {}
    plan = model.plan
    rows.append(SweepRow(
        policy=policy, budget_bytes=None if plan.budget_bytes is None else int(plan.budget_bytes),
        slots_per_layer=tuple(plan.slots_per_layer), rouge2=rouge.rouge2(predictions, references),
        ms_per_token=res["ms_per_token"], tokens=res["tokens"],
        redirect_rate=float(stats.get("redirect_rate", 0.0)), misses=int(stats.get("misses", 0)),
        experts_swapped=int(stats.get("experts_swapped", 0)), predictions=tuple(predictions)))
  return rows


def format_table(rows: Sequence[SweepRow]) -> str:
  """The rows as an aligned text table (budget, K per layer, Rouge-2 x100, ms/token, telemetry)."""
  from swapmoe_jax.serving.budget import format_bytes

  head = ("policy", "budget", "K per layer", "Rouge-2", "ms/token", "tokens", "redirected", "misses", "swapped")
  body = [(r.policy, "-" if r.budget_bytes is None else format_bytes(r.budget_bytes),
           ",".join(map(str, sorted(set(r.slots_per_layer)))), f"{100 * r.rouge2:.2f}", f"{r.ms_per_token:.2f}",
           str(r.tokens), f"{100 * r.redirect_rate:.1f}%", str(r.misses), str(r.experts_swapped)) for r in rows]
  widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
  return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [head, *body])


def plot_rows(rows: Sequence[SweepRow]):
  """Rouge-2 and ms/token against the budget, one line per policy; "full" as a dashed line. Needs
  matplotlib (`pip install matplotlib`). Returns the figure."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  metrics = (("rouge2", "Rouge-2 F1 (x100)", 100.0), ("ms_per_token", "ms / token", 1.0))
  for ax, (field, label, scale) in zip(axes, metrics):
    for policy in dict.fromkeys(r.policy for r in rows):
      points = sorted((r.budget_bytes, getattr(r, field)) for r in rows if r.policy == policy)
      if policy == "full":
        ax.axhline(scale * points[0][1], color="gray", linestyle="--", label="full (no budget)")
      else:
        ax.plot([b / 2**20 for b, _ in points], [scale * v for _, v in points], marker="o", label=policy)
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  return fig
