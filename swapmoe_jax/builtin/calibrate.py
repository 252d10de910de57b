"""The built-in model's stored calibration: expert importance (Eq. 1) over 64 prompts of its training
draw — never the held-out requests the evaluation scores — which `load`'s default planner ("auto")
uses for K_l per layer and the first residents at any budget.

  python -m swapmoe_jax.builtin.calibrate      # rewrites assets/default_model/calibration.json
"""

from __future__ import annotations

import random

import numpy as np

CALIBRATION_PROMPTS = 64
CALIBRATION_SEED = 12345


def calibration_prompts(tokenizer, n: int = CALIBRATION_PROMPTS, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
  """int32[1, T] token ids of `n` training-draw prompts (`tasks.training_examples`)."""
  from swapmoe_jax.builtin import tasks

  return [np.asarray(tokenizer(e.prompt)["input_ids"], np.int32)[None]
          for e in tasks.training_examples(n, random.Random(seed))]


def main() -> int:
  from swapmoe_jax.builtin.demo import default_checkpoint
  from swapmoe_jax.serving.loader import calibrate_checkpoint, load

  folder = default_checkpoint()
  tok = load(folder).tokenizer
  path = calibrate_checkpoint(folder, calibration_prompts(tok), note=(
      f"{CALIBRATION_PROMPTS} prompts of tasks.training_examples(random.Random({CALIBRATION_SEED})); "
      "python -m swapmoe_jax.builtin.calibrate"))
  print(path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
