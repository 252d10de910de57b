"""Exact policies against `full` on one shape with random weights: logits and greedy tokens.

  python benchmarks/exact_parity.py --shape switch-base-64 --dtype bfloat16 float32 --budget 33%

For each dtype: teacher-forced logits of `full` and of `lfu` under the budget (most experts read from
host memory inside the step) on the same random requests, their largest absolute difference against
the spread of the logits, the share of positions whose argmax differs, and the share of greedy
generated tokens that agree. Exact routing computes the same function as `full` through another
program; on the CPU the two agree bit for bit on the test models, and this script measures how far
apart they are on a GPU.

The same figures for `full` against itself on the request duplicated into a batch of two (the same
function through another program, with no residency involved) give the rounding noise floor those
numbers are to be read against. `--init flat` draws the random weights with std 0.05 everywhere
(ill-conditioned: near-hard attention) instead of Hugging Face's initialization; `--pool P` makes
expert e a copy of expert e mod P (P = the expert count: all distinct).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="switch-base-8")
  p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
  p.add_argument("--budget", default="33%")
  p.add_argument("--policy", default="lfu")
  p.add_argument("--requests", type=int, default=4)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--init", default="hf", choices=("hf", "flat"))
  p.add_argument("--pool", type=int, default=16, help="distinct random experts per layer (default 16)")
  args = p.parse_args(argv)


  import random_model
  from shapes import SHAPES

  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))
  for dtype in args.dtype:
    pool = min(args.pool, cfg.num_experts)
    parts = random_model.random_model_parts(cfg, dtype, pool=pool, init=args.init)
    request = dict(src_len=args.src_len, new_tokens=args.new_tokens)
    # batch 2 for full: the noise floor runs the request twice in one batch
    models = {policy: random_model.build(cfg, dtype, policy, None if policy == "full" else args.budget, parts=parts,
                                         batch=2 if policy == "full" else 1, **request).model
              for policy in ("full", args.policy)}
    full, exact = models["full"], models[args.policy]
    rng = np.random.default_rng(0)
    diffs, spreads, flips, agree, floor, floor_flips, margins = [], [], [], [], [], [], []
    for _ in range(args.requests):
      ids = rng.integers(2, cfg.vocab_size, (1, args.src_len))
      out = full.generate(ids, max_new_tokens=args.new_tokens)
      dec = np.concatenate([[[cfg.decoder_start_token_id]], out[:, :-1]], axis=1)
      a, b = np.asarray(full(ids, decoder_input_ids=dec)), np.asarray(exact(ids, decoder_input_ids=dec))
      diffs.append(float(np.abs(a - b).max()))
      spreads.append(float(a.std()))
      flips.append(float(np.mean(a.argmax(-1) != b.argmax(-1))))
      agree.append(float(np.mean(exact.generate(ids, max_new_tokens=args.new_tokens) == out)))
      twice = np.asarray(full(np.repeat(ids, 2, 0), decoder_input_ids=np.repeat(dec, 2, 0)))[:1]
      floor.append(float(np.abs(a - twice).max()))
      floor_flips.append(float(np.mean(a.argmax(-1) != twice.argmax(-1))))
      top2 = np.sort(a.astype(np.float32), axis=-1)[..., -2:]
      margins.append(float(np.median(top2[..., 1] - top2[..., 0])))
    s = exact.stats.summary()
    print(f"{args.shape} {dtype} {args.policy}@{args.budget} (K={exact.plan.slots_per_layer[0]} of {cfg.num_experts}, "
          f"hit rate {100 * (s['hit_rate'] or 0):.0f} %): max |logit diff| {max(diffs):.3g} (logit std "
          f"{np.mean(spreads):.3g}), argmax differs at {100 * np.mean(flips):.1f} % of teacher-forced positions, "
          f"greedy tokens agree {100 * np.mean(agree):.1f} %", flush=True)
    print(f"  noise floor ({args.init} init, {pool} distinct experts): full vs full in a batch of two: max |logit "
          f"diff| {max(floor):.3g}, argmax differs at {100 * np.mean(floor_flips):.1f} %; median top-1/top-2 logit gap "
          f"{np.median(margins):.3g}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
