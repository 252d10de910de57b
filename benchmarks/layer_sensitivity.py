"""How much each MoE layer of the built-in model loses with K of its experts, measured on the calibration
prompts, and the slots per layer that greedy allocation on that loss would give.

  python benchmarks/layer_sensitivity.py --experts 2,3,4,5,8 --out benchmarks/layer_sensitivity.json

For each calibration prompt (the 64 training-draw prompts of the stored calibration, never the held-out
requests): its own routing importance (Eq. 1, exact routing, as `calibrate` measures it) and its
greedy answer with every expert resident. Then for every MoE layer l and K = 1..E-1, that layer alone
restricted to K experts (its index map emptied of the others: masked routing there, every other layer
full) and the teacher-forced KL(full || restricted) over the answer's tokens, averaged over prompts:

- *static*: the K experts are the top-K of the summed calibration importance (what a static plan holds);
- *per prompt*: each prompt's own top-K (what a controller that tracks every request perfectly holds).

Greedy allocation on either curve (each next slot to the layer whose loss falls most) is printed per K
beside the stored calibration's coverage plan, so allocations can be compared with
`ablate_controller.py --slots`. CPU is fine (~1 min). Rows: one JSON object in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def greedy(loss: np.ndarray, total: int) -> list[int]:
  """K_l with sum `total`, each next slot to the layer whose loss[l, K_l] - loss[l, K_l + 1] is largest."""
  num_layers, e = loss.shape[0], loss.shape[1] - 1
  slots = [1] * num_layers
  for _ in range(total - num_layers):
    gains = [loss[l, slots[l]] - loss[l, slots[l] + 1] if slots[l] < e else -np.inf for l in range(num_layers)]
    slots[int(np.argmax(gains))] += 1
  return slots


def main(argv=None) -> int:
  import jax
  from flax import nnx

  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.builtin.calibrate import calibration_prompts
  from swapmoe_jax.builtin.demo import default_checkpoint
  from swapmoe_jax.serving import loader
  from swapmoe_jax.serving import planner as planner_lib

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--experts", default="2,3,4,5,8", help="K per layer on average, comma-separated")
  p.add_argument("--new-tokens", type=int, default=16, help="greedy answer tokens per prompt")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "layer_sensitivity.json"))
  a = p.parse_args(argv)
  folder = default_checkpoint()
  meta = ckpt.read_metadata(folder)
  cfg = meta.config
  num_layers, e = cfg.num_moe_layers, cfg.num_experts
  dtype = loader.DTYPES[meta.dtype]
  store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, dtype, pinned=True,
                                            banks=True)
  dense = ckpt.restore_dense(meta)
  # Per-prompt importance: calibration's own measurement (exact routing, one slot), read prompt by prompt.
  exact = loader.assemble(cfg, dense, store, loader._OneSlotPlan(num_layers), policy="lru", gate_mode="original",
                          dtype=dtype)
  full = loader.load(folder)
  prompts = calibration_prompts(full.tokenizer)
  per_prompt, before = [], np.zeros((num_layers, e))
  for ids in prompts:
    exact.generate(ids, max_new_tokens=a.new_tokens)
    now = np.array(exact.residency.totals.importance, np.float64)
    per_prompt.append(now - before)
    before = now
  per_prompt = np.array(per_prompt)

  # Teacher-forced log-probabilities of each prompt's greedy answer, at one padded shape (one compile).
  src_len = max(ids.shape[1] for ids in prompts)

  def padded(ids, answer):
    x, mask = np.zeros((1, src_len), np.int32), np.zeros((1, src_len), bool)
    x[0, :ids.shape[1]], mask[0, :ids.shape[1]] = ids[0], True
    dec, dmask = np.zeros((1, a.new_tokens), np.int32), np.zeros((1, a.new_tokens), bool)
    dec[0, 0], dec[0, 1:answer.shape[1]] = cfg.decoder_start_token_id, answer[0, :-1]
    dmask[0, :answer.shape[1]] = True
    return x, mask, dec, dmask

  def logp(ids, answer):
    x, mask, dec, dmask = padded(ids, answer)
    z = np.asarray(full(x, mask, dec, dmask), np.float64)[0][dmask[0]]
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  answers = [np.asarray(full.generate(ids, max_new_tokens=a.new_tokens), np.int32) for ids in prompts]
  reference = [logp(ids, ans) for ids, ans in zip(prompts, answers)]
  moe_of = loader._family(cfg, dense)[2]
  base = nnx.to_pure_dict(full.slots)  # every expert resident: slot e holds expert e
  curves = {}
  for kind in ("static", "per_prompt"):
    loss = np.zeros((num_layers, e + 1))
    for layer, (stack, block) in enumerate(cfg.moe_layers):
      for k in range(1, e):
        total = 0.0
        for i, (ids, ans) in enumerate(zip(prompts, answers)):
          imp = per_prompt[:, layer].sum(0) if kind == "static" else per_prompt[i, layer]
          keep = np.argsort(-imp, kind="stable")[:k]
          slot_of = np.full((e,), -1, np.int32)
          slot_of[keep] = keep
          tree = jax.tree.map(lambda x: x, base)
          moe_of(tree, stack, block)["slot_of"] = jax.numpy.asarray(slot_of)
          state = full.slots
          nnx.replace_by_pure_dict(state, tree)
          full.slots = state
          ref, got = reference[i], logp(ids, ans)
          total += float(np.sum(np.exp(ref) * (ref - got), -1).mean())
        loss[layer, k] = total / len(prompts)
      print(f"{kind:10s} layer {layer}: KL at K=1..{e - 1} " + " ".join(f"{x:.4f}" for x in loss[layer, 1:e]),
            file=sys.stderr, flush=True)
    curves[kind] = loss
  state = full.slots
  nnx.replace_by_pure_dict(state, base)
  full.slots = state

  importance = ckpt.read_calibration(folder, cfg)
  rows = []
  print("| K per layer | coverage (stored calibration, the default) | KL, static | KL, per prompt | KL, geometric mean |")
  print("|---|---|---|---|---|")
  geo = np.sqrt(curves["static"] * curves["per_prompt"])
  for k in (int(x) for x in a.experts.split(",")):
    budget = loader.experts_budget(folder, k, max_source_len=32, max_new_tokens=16)
    coverage = planner_lib.plan_calibrated(cfg, budget, np.dtype(dtype).itemsize,
                                           **loader.request_shape(cfg, 1, 32, 16), importance=importance)
    row = dict(experts=k, coverage=list(coverage.slots_per_layer), static=greedy(curves["static"], k * num_layers),
               per_prompt=greedy(curves["per_prompt"], k * num_layers), geometric=greedy(geo, k * num_layers))
    rows.append(row)
    print(f"| {k} | {row['coverage']} | {row['static']} | {row['per_prompt']} | {row['geometric']} |")
  with open(a.out, "w") as f:
    json.dump({"prompts": len(prompts), "kl_static": curves["static"].tolist(),
               "kl_per_prompt": curves["per_prompt"].tolist(), "allocations": rows}, f)
    f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
