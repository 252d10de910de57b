"""Controller ablation on the built-in model: the swapmoe controller's score decay, when swaps land,
hysteresis, window, swap rate and planner, on the same held-out request stream, with paired 95 %
intervals against the shipped default.

  python benchmarks/ablate_controller.py --experts 3,5 --requests 300 --variants default,hyst-0.5 \
      --out benchmarks/ablation.jsonl

Each variant is `load(default_checkpoint(), experts=K, policy="swapmoe", **its keywords)` (VARIANTS)
served the "runs" stream (families in runs of 8, as a user's session) one request at a time, greedy;
exact match against the task's answer, redirect rate and swaps from `model.stats`. CPU is fine: this
measures accuracy, not speed. Rows are appended to `--out` as JSON lines and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (key, name, load() keyword arguments); the first is the shipped default, the reference of the intervals.
# The variants measured against earlier defaults, which had no prompt residency and planned K per
# layer uniformly (the built-in model has shipped a calibration, which the default planner uses, since
# session 31).
UNIFORM = dict(planner="uniform")
OLD = dict(UNIFORM, prompt_residency=False)
VARIANTS = (
    ("default", "default: stored calibration, decay 0.5, hysteresis 0.5, prompt residency, drained", {}),
    ("uniform", "uniform K per layer (the default before the stored calibration)", UNIFORM),
    ("no-prompt", "no prompt residency, swaps drained at request ends (the default before b7bee22)", OLD),
    ("prompt-no-drain", "prompt residency, swaps only during calls (the default of b7bee22 to 72e8f4f)",
     dict(UNIFORM, swap_between_requests=False)),
    ("no-drain", "decay 0.5, swaps only during calls", dict(OLD, swap_between_requests=False)),
    ("decay-0.95", "decay 0.95 (an earlier default), drained", dict(OLD, decay=0.95)),
    ("previous", "decay 0.95, swaps only during calls (an earlier default)",
     dict(OLD, decay=0.95, swap_between_requests=False)),
    ("decay-0.2", "decay 0.2, drained", dict(OLD, decay=0.2)),
    ("hyst-0.25", "hysteresis 0.25", dict(OLD, hysteresis=0.25)),
    ("hyst-0.5", "hysteresis 0.5", dict(OLD, hysteresis=0.5)),
    ("hyst-1", "hysteresis 1.0", dict(OLD, hysteresis=1.0)),
    ("window-4", "window of 4 steps (update_every=4)", dict(OLD, update_every=4)),
    ("window-64", "window of 64 steps (update_every=64)", dict(OLD, update_every=64)),
    ("swaps-8", "8 swaps per call (max_swaps_per_step=8)", dict(OLD, max_swaps_per_step=8)),
    ("prompt-swaps-8", "prompt residency, 8 swaps per call and per commit (max_swaps_per_step=8)",
     dict(UNIFORM, max_swaps_per_step=8)),
    ("calibrated", "calibrated planner (K_l and initial residents from 64 training prompts)",
     dict(OLD, planner="calibrated")),
    ("full", "full (every expert resident; the ceiling)", dict(policy="full")),
    ("refit-0", "prefill-informed: every request's encoder refitted to its own routing", dict(OLD, prefill_refit=0.0)),
    ("refit-0.1", "prefill-informed: refitted when >10 % of its encoder tokens were redirected",
     dict(OLD, prefill_refit=0.1)),
    ("refit-0.2", "prefill-informed: refitted when >20 % were redirected", dict(OLD, prefill_refit=0.2)),
    ("calibrated-refit", "calibrated planner and prefill-informed residency (refit at 10 %)",
     dict(OLD, planner="calibrated", prefill_refit=0.1)),
    ("term-counts", "importance term: tokens routed (instead of Eq. 1)", dict(OLD, importance_term="counts")),
    ("term-routed", "importance term: Eq. 1 without the expert's norm", dict(OLD, importance_term="routed")),
    ("prompt-refit", "prompt residency and prefill-informed residency (refit at 10 %)",
     dict(UNIFORM, prefill_refit=0.1)),
    ("prompt-calibrated", "prompt residency and the calibrated planner", dict(planner="calibrated")),
    ("hyst-1-now", "today's default with hysteresis 1.0 (fewer swaps: what a GPU request pays for)",
     dict(hysteresis=1.0)),
    ("gpu-latency", "today's default with hysteresis 1.0 and no drain at request ends (the fewest swaps on a GPU)",
     dict(hysteresis=1.0, swap_between_requests=False)),
    ("gpu-latency-2", "today's default with hysteresis 2.0 and no drain at request ends",
     dict(hysteresis=2.0, swap_between_requests=False)),
    ("no-prompt-now", "today's default without prompt residency (what the task runs alone give the controller)",
     dict(prompt_residency=False)),
    ("prompt-calibrated-refit", "prompt residency, the calibrated planner and refit at 10 %",
     dict(planner="calibrated", prefill_refit=0.1)),
)


def main(argv=None) -> int:
  from swapmoe_jax.builtin import tasks
  from swapmoe_jax.builtin.calibrate import calibration_prompts
  from swapmoe_jax.builtin.demo import default_checkpoint
  from swapmoe_jax.eval.evaluate import NEW_TOKENS, SRC_LEN, _decode_text
  from swapmoe_jax.eval.paired import paired_difference
  from swapmoe_jax.eval.requests import make_requests, run_stream
  from swapmoe_jax.serving.loader import load

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--experts", default="3,5", help="resident experts per MoE layer, comma-separated")
  p.add_argument("--requests", type=int, default=200)
  p.add_argument("--stream", default="runs", choices=("runs", "shuffled"))
  p.add_argument("--seed", type=int, default=0, help="the request stream's seed (evaluate's --seed)")
  p.add_argument("--variants", default=",".join(k for k, _, _ in VARIANTS),
                 help="comma-separated keys of VARIANTS (the default is always run first, as the reference)")
  p.add_argument("--slots", default="",
                 help="K per MoE layer, comma-separated (e.g. 6,6,4,4), for every variant but full, at the "
                      "bytes of one --experts K (load's planner given as a sequence): compares allocations")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablation.jsonl"))
  a = p.parse_args(argv)
  folder = default_checkpoint()
  limits = dict(max_batch_size=1, max_source_len=SRC_LEN, max_new_tokens=NEW_TOKENS)
  examples = tasks.request_stream(a.requests, a.stream, seed=a.seed)
  tok = load(folder, **limits).tokenizer
  reqs = make_requests(tok, [(e.prompt, e.answer) for e in examples], src_len=SRC_LEN, tgt_len=NEW_TOKENS)
  slots = tuple(int(x) for x in a.slots.split(",")) if a.slots else None
  if slots and "," in a.experts:
    p.error("--slots needs a single --experts (the bytes its slots are spread over)")
  keys = ["default"] + [v for v in a.variants.split(",") if v and v != "default"]
  known = {key: (name, kw) for key, name, kw in VARIANTS}
  if any(v not in known for v in keys):
    p.error(f"unknown variants {[v for v in keys if v not in known]}; choose from {', '.join(known)}")
  # Calibration prompts come from the training draw (never the held-out requests): those of the
  # calibration stored with the built-in model, which the default planner uses.
  calibration = calibration_prompts(tok)
  rows = []
  for k in (int(x) for x in a.experts.split(",")):
    reference = None
    for i, key in enumerate(keys):
      name, kw = known[key]
      if kw.get("planner") == "calibrated":
        kw = dict(kw, calibration_inputs=calibration)
      if slots and kw.get("policy") != "full":
        kw, name = dict(kw, planner=slots), f"{name}; K per layer {list(slots)}"
      t = time.perf_counter()
      if kw.get("policy") == "full":
        model = load(folder, **limits)
      else:
        model = load(folder, experts=k, policy="swapmoe", **kw, **limits)
      out = run_stream(model, reqs, max_new_tokens=NEW_TOKENS)["outputs"]
      correct = [int(_decode_text(tok, o) == e.answer) for o, e in zip(out, examples)]
      s = model.stats.summary()
      reference = reference or correct
      diff = None if i == 0 else paired_difference(correct, reference)
      refits = model.residency.refits
      row = dict(experts=k, variant=name, key=key, **{n: v for n, v in kw.items() if n != "calibration_inputs"},
                 refits=refits, refit_matches=model.residency.refit_matches, correct=correct,
                 stream=a.stream, seed=a.seed,
                 requests=len(reqs), exact_match=float(np.mean(correct)), redirect_rate=s["redirect_rate"],
                 experts_swapped=s["experts_swapped"], vs_default=None if diff is None else diff.points(),
                 seconds=round(time.perf_counter() - t, 1))
      rows.append(row)
      with open(a.out, "a") as f:  # each row as it comes: a long run that dies keeps what it measured
        f.write(json.dumps(row) + "\n")
      print(f"K={k:2d} {name:58s} EM {100 * row['exact_match']:5.1f}%  redirect {100 * row['redirect_rate']:5.1f}%  "
            f"swaps {row['experts_swapped']:5d}  vs default {row['vs_default'] or '—'}", file=sys.stderr, flush=True)
  print("| experts | variant | exact match | vs default [95% CI] | redirected | swaps |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['experts']}/16 | {r['variant']} | {100 * r['exact_match']:.1f}% | {r['vs_default'] or '—'} | "
          f"{100 * r['redirect_rate']:.1f}% | {r['experts_swapped']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
