"""The built-in model's stored calibration: expert importance (Eq. 1) over 64 prompts of its training
draw, and K per MoE layer searched for `swapmoe` and `pruned` on 600 requests of the training draw —
never the held-out requests the evaluation scores — which `load`'s default planner ("auto") uses for
K_l per layer (each policy its own) and the first residents at any budget.

  python -m swapmoe_jax.builtin.calibrate      # rewrites assets/default_model/calibration.json (~1 h on a CPU)
  python -m swapmoe_jax.builtin.calibrate --search-only --policies pruned   # one policy's search again
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np

CALIBRATION_PROMPTS = 64
CALIBRATION_SEED = 12345
# The allocation search's requests: training-space prompts in runs of 8 of one family (as the
# evaluation's "runs" stream, from the other space and another seed), answered up to as many tokens as
# the evaluation allows.
SEARCH_REQUESTS = 600
SEARCH_SEED = 2024
SEARCH_EXPERTS = (2, 3, 4, 5, 8)
SEARCH_NEW_TOKENS = 24
SEARCH_POLICIES = ("swapmoe", "pruned")


def calibration_prompts(tokenizer, n: int = CALIBRATION_PROMPTS, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
  """int32[1, T] token ids of `n` training-draw prompts (`tasks.training_examples`)."""
  from swapmoe_jax.builtin import tasks

  return [np.asarray(tokenizer(e.prompt)["input_ids"], np.int32)[None]
          for e in tasks.training_examples(n, random.Random(seed))]


def search_prompts(tokenizer, n: int = SEARCH_REQUESTS, seed: int = SEARCH_SEED) -> list[np.ndarray]:
  """int32[1, T] token ids of `n` training-space requests in runs of 8 of one family
  (`tasks.request_stream(..., held_out=False)`), in arrival order."""
  from swapmoe_jax.builtin import tasks

  return [np.asarray(tokenizer(e.prompt)["input_ids"], np.int32)[None]
          for e in tasks.request_stream(n, "runs", seed=seed, held_out=False)]


def main(argv=None) -> int:
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.builtin.demo import default_checkpoint
  from swapmoe_jax.serving.allocation import search_allocations
  from swapmoe_jax.serving.loader import calibrate_checkpoint, load

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--experts", default=",".join(map(str, SEARCH_EXPERTS)),
                 help="K (resident experts per layer on average) to search allocations for; '' for none")
  p.add_argument("--policies", default=",".join(SEARCH_POLICIES),
                 help="policies to search allocations for, comma-separated")
  p.add_argument("--search-only", action="store_true",
                 help="keep the stored importance and the other policies' allocations; search only --policies "
                      "(recalibrating drops every stored allocation, which were searched with its residents)")
  a = p.parse_args(argv)
  folder = default_checkpoint()
  tok = load(folder).tokenizer
  path = os.path.join(folder, ckpt.CALIBRATION_FILE)
  if not a.search_only:
    path = calibrate_checkpoint(folder, calibration_prompts(tok), note=(
        f"{CALIBRATION_PROMPTS} prompts of tasks.training_examples(random.Random({CALIBRATION_SEED})); "
        "python -m swapmoe_jax.builtin.calibrate"))
  experts = [int(k) for k in a.experts.split(",") if k]
  policies = [q for q in a.policies.split(",") if q]
  if experts:
    prompts = search_prompts(tok)  # the same requests for every policy
    for policy in policies:
      search_allocations(
          folder, prompts, experts, policy=policy, max_new_tokens=SEARCH_NEW_TOKENS,
          note=(f"searched on {SEARCH_REQUESTS} requests of tasks.request_stream(runs, seed={SEARCH_SEED}, "
                "held_out=False); python -m swapmoe_jax.builtin.calibrate"),
          progress=lambda line, policy=policy: print(f"{policy}: {line}", file=sys.stderr, flush=True))
  print(path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
