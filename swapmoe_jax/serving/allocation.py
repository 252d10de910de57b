"""K per layer searched on calibration requests: which allocation of a budget's slots over the MoE
layers keeps a policy's answers closest to the full model's.

SWAPMOE.md §2: the paper searches {K_1..K_L} with a genetic algorithm over a fitted accuracy predictor.
The coverage rule of `planner.plan_calibrated` reads only the routing importance, and it misjudges what
a redirect costs per layer (on the built-in model it gives the spread-out second encoder layer slots
that the decoder needs more: README, Accuracy against budget). Here the objective is measured instead
of predicted: each candidate allocation is loaded with the policy it is for (its controller, swaps
and prompt residency included), serves the calibration requests in their arrival order, and scores the
requests whose greedy answer equals the full model's (no labels needed), plus the mean share of each
answer's tokens before the first difference (a tie-break worth under one request). Candidates are
explored by `planner.local_search` (one slot moved between two layers at a time) from the better of
the stored plan and the equal split. The result is stored with the calibration
(`checkpoint.write_allocations`), where `load`'s calibrated planner starts from it.

A search costs (rounds x L(L-1) + 2) loads and passes over the requests for each K: minutes for the
built-in model on a CPU, so it runs once, offline, like the calibration.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from swapmoe_jax.serving.sampling import tokens_until_eos

# Policies whose answers depend on where the slots are: the exact ones (lru, lfu) answer as `full`
# whatever the allocation, and `full` has none.
SEARCHED_POLICIES = ("swapmoe", "pruned", "selective", "fallback")


def padded(prompts: Sequence, pad_id: int, multiple: int = 8) -> tuple[list[np.ndarray], list[np.ndarray], int]:
  """Each prompt (int token ids, [S] or [1, S]) as int32 [1, W] with its bool mask, W the longest
  prompt rounded up to `multiple` (one shape, one compile per candidate); and W."""
  arrays = [np.asarray(p, np.int32) for p in prompts]
  if any(a.ndim > 2 or (a.ndim == 2 and a.shape[0] != 1) for a in arrays):
    raise ValueError("each request is one prompt's token ids, [S] or [1, S]; got shapes "
                     f"{sorted({a.shape for a in arrays if a.ndim != 1 and a.shape[:1] != (1,)})}")
  rows = [a.reshape(-1) for a in arrays]
  if not rows or any(r.size == 0 for r in rows):
    raise ValueError("the search needs at least one request, and no empty prompt")
  width = -(-max(r.size for r in rows) // multiple) * multiple
  ids, masks = [], []
  for r in rows:
    row = np.full((1, width), pad_id, np.int32)
    row[0, :r.size] = r
    mask = np.zeros((1, width), bool)
    mask[0, :r.size] = True
    ids.append(row)
    masks.append(mask)
  return ids, masks, width


def answers(model, ids, masks, max_new_tokens: int) -> list[np.ndarray]:
  """`model`'s greedy answer to each request, served in order, each up to and including its EOS."""
  eos = model.config.eos_token_ids
  out = []
  for i, m in zip(ids, masks):
    row = np.asarray(model.generate(i, m, max_new_tokens=max_new_tokens))[0]
    out.append(row[:tokens_until_eos(row, eos)])
  return out


def agreement(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
  """Requests whose answer equals `want`'s, plus the mean share of `want`'s tokens before the first
  difference (in [0, 1], so it only breaks ties)."""
  equal, shares = 0, []
  for g, w in zip(got, want):
    n = min(g.size, w.size)
    diff = np.flatnonzero(g[:n] != w[:n])
    prefix = int(diff[0]) if diff.size else n
    equal += int(g.size == w.size and prefix == n)
    shares.append(prefix / max(w.size, 1))
  return equal + float(np.mean(shares))


def search_allocations(folder: str | os.PathLike, prompts: Sequence, experts: Sequence[int], *,
                       policy: str = "swapmoe", max_new_tokens: int = 16, rounds: int = 6,
                       min_gain: float | None = None, store: bool = True, note: str = "",
                       progress: Callable[[str], None] | None = None) -> dict:
  """Searches K per layer for `experts` = K resident experts per layer on average (the bytes of
  `load(folder, experts=K)`), serving `prompts` (token-id arrays, in arrival order) with `policy`.

  The checkpoint needs a stored calibration (`loader.calibrate_checkpoint`): candidates take their
  residents from it, as `load` does.

  Args:
    min_gain: how much a move must raise the score to be taken (default: 0.5 % of the requests), so that
      the search does not follow the noise of a few answers.
    store: write the allocations found into the calibration (`checkpoint.write_allocations`).
    note: stored beside them (how to reproduce them).
    progress: called with one line per scored candidate.

  Returns:
    {"allocations": {total slots: K per layer}, "trace": {K: [{"slots", "score", "round"}, ...]},
     "requests": n, "reference": "full"}.
  """
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import planner as planner_lib
  from swapmoe_jax.serving.loader import load

  if policy not in SEARCHED_POLICIES:
    raise ValueError(f"search_allocations is for the policies whose outputs depend on the allocation "
                     f"({', '.join(SEARCHED_POLICIES)}), not {policy!r}")
  meta = ckpt.read_metadata(folder)
  cfg = meta.config
  if ckpt.read_calibration(folder, cfg) is None:
    raise ckpt.CheckpointError(f"{folder} has no stored calibration; run calibrate_checkpoint before "
                               "search_allocations")
  ids, masks, width = padded(prompts, cfg.pad_token_id)
  shape = dict(max_batch_size=1, max_source_len=width, max_new_tokens=max_new_tokens)
  want = answers(load(folder, **shape), ids, masks, max_new_tokens)
  gain = 0.005 * len(ids) if min_gain is None else float(min_gain)
  say = progress or (lambda line: None)
  found, traces = {}, {}

  def served(model) -> float:
    got = answers(model, ids, masks, max_new_tokens)
    # Each candidate compiles its own programs (its slot shapes); dozens of them exhaust the CPU
    # backend's code memory ("LLVM ERROR: Unable to allocate section memory") unless released.
    jax.clear_caches()
    gc.collect()
    return agreement(got, want)

  for k in experts:
    k = int(k)
    if not 1 <= k < cfg.num_experts:
      raise ValueError(f"experts must be in [1, {cfg.num_experts - 1}] (fewer than all), got {k}")

    def score(slots, k=k):
      return served(load(folder, experts=k, policy=policy, planner=tuple(slots), **shape))

    # The stored plan is scored on the model loaded to learn it; the equal split is loaded as a candidate.
    model = load(folder, experts=k, policy=policy, **shape)
    stored = tuple(model.plan.slots_per_layer)
    starts = {stored: served(model)}
    del model
    uniform = (k,) * cfg.num_moe_layers
    if uniform not in starts:
      starts[uniform] = score(uniform)
    for slots, s in starts.items():
      say(f"K={k} start {list(slots)}: {s:.2f} of {len(ids)}")
    start = max(starts, key=lambda s: starts[s])
    best, trace = planner_lib.local_search(
        start, score, num_experts=cfg.num_experts, max_rounds=rounds, min_gain=gain, known=starts,
        on_score=lambda slots, s, k=k: say(f"K={k} {list(slots)}: {s:.2f} of {len(ids)}"))
    found[sum(best)] = best
    traces[k] = [dict(slots=list(s), score=v, round=0) for s, v in starts.items()] + trace
    say(f"K={k}: {list(best)}")
  if store:
    ckpt.write_allocations(folder, policy, found, note=note,
                           trace=dict(requests=len(ids), min_gain=gain, by_experts={str(k): t for k, t in traces.items()}))
  return dict(allocations=found, trace=traces, requests=len(ids), reference="full")
