"""Accuracy against memory budget: exact match and agreement with `full`, per policy and gate option.

  python -m swapmoe_jax.evaluate                       # the built-in model, the default grid
  python -m swapmoe_jax.evaluate --budgets 100,33 --policies swapmoe,pruned --requests 50 --out /tmp/ev

Budgets are fractions of *expert* memory: K = round(f * E) resident experts per MoE layer (at least 1),
with the rest of the model (dense weights, caches, staging, workspace) accounted for as usual. Requests
come one at a time (batch 1) from a stream of held-out task prompts (`tasks.request_stream`): "runs"
(a family for several requests in a row, as in a user's session) or "shuffled". For each (stream,
budget, policy, gate) it measures:
- exact match against the task's answer (checkable by construction);
- token agreement of the generated ids with `full` on the same requests;
- under teacher forcing on given text (model-agnostic fidelity): next-token argmax agreement with
  `full` and the mean KL(full || model) of the next-token distributions;
- decode time per token, redirect rate (masked policies), miss rate (exact policies), experts swapped.
Writes `evaluation.md`, `evaluation.json` and `evaluation.png` into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from swapmoe_jax import tasks

DEFAULT_BUDGETS = (100, 75, 50, 33, 25, 15)
DEFAULT_POLICIES = ("full", "swapmoe", "pruned", "lru", "lfu")
GATED = ("swapmoe", "pruned")  # the gate option only matters for masked routing
SRC_LEN, NEW_TOKENS = 32, 24


@dataclasses.dataclass
class Request:
  """One evaluation request: token arrays padded to fixed shapes (one compile per model)."""

  example: tasks.Example
  ids: np.ndarray  # int32 [1, S]
  mask: np.ndarray  # bool [1, S]
  target: np.ndarray  # int32 [1, T]: the answer's ids then EOS, padded
  target_mask: np.ndarray  # bool [1, T]


def make_requests(tokenizer, examples, src_len: int = SRC_LEN, tgt_len: int = NEW_TOKENS) -> list[Request]:
  out = []
  for ex in examples:
    src = tokenizer(ex.prompt, padding="max_length", max_length=src_len, truncation=True, return_tensors="np")
    tgt = tokenizer(ex.answer, padding="max_length", max_length=tgt_len, truncation=True, return_tensors="np")
    out.append(Request(ex, src["input_ids"].astype(np.int32), src["attention_mask"].astype(bool),
                       tgt["input_ids"].astype(np.int32), tgt["attention_mask"].astype(bool)))
  return out


def _decode_text(tokenizer, ids) -> str:
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


def run_stream(model, requests: list[Request]) -> dict:
  """Generates every request in order (greedy); returns ids per request and the time per generated token
  (from the second request on: the first one compiles)."""
  outs, tokens, seconds = [], 0, 0.0
  for n, r in enumerate(requests):
    t0 = time.perf_counter()
    out = model.generate(r.ids, r.mask, max_new_tokens=NEW_TOKENS)
    if n:  # the first request compiles: not timed
      seconds += time.perf_counter() - t0
      tokens += out.shape[1]
    outs.append(out[0])
  return dict(outputs=outs, ms_per_token=1e3 * seconds / max(tokens, 1))


def teacher_forced(model, requests: list[Request]) -> list[np.ndarray]:
  """Next-token log-probabilities float32 [T, V] per request, under teacher forcing on the answers."""
  cfg = model.config
  out = []
  for r in requests:
    dec = np.concatenate([np.full((1, 1), cfg.decoder_start_token_id, np.int32), r.target[:, :-1]], axis=1)
    logits = np.asarray(model(r.ids, r.mask, dec, r.target_mask))[0]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out.append(logp[r.target_mask[0]])
  return out


def agreement(outputs, reference) -> float:
  """Matching positions / positions, summed over requests (a position past a sequence's end mismatches)."""
  match = total = 0
  for a, b in zip(outputs, reference):
    n = max(len(a), len(b))
    m = min(len(a), len(b))
    match += int(np.sum(np.asarray(a[:m]) == np.asarray(b[:m])))
    total += n
  return match / max(total, 1)


def fidelity(logps, reference_logps) -> tuple[float, float]:
  """(argmax agreement, mean KL(reference || model)) over every teacher-forced position."""
  agree = kl = n = 0
  for lp, ref in zip(logps, reference_logps):
    agree += int(np.sum(lp.argmax(-1) == ref.argmax(-1)))
    kl += float(np.sum(np.exp(ref) * (ref - lp)))
    n += lp.shape[0]
  return agree / max(n, 1), kl / max(n, 1)


def evaluate(folder: str, *, budgets=DEFAULT_BUDGETS, policies=DEFAULT_POLICIES,
             gates=("original", "renormalized"), streams=("runs", "shuffled"), requests: int = 200, seed: int = 0,
             dtype: str | None = None, progress=None) -> list[dict]:
  """The evaluation grid; one row per (stream, budget, policy, gate). See the module docstring."""
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.loader import experts_budget, load

  meta = ckpt.read_metadata(folder)
  e = meta.config.num_experts
  limits = dict(max_batch_size=1, max_source_len=SRC_LEN, max_new_tokens=NEW_TOKENS)
  rows = []
  for stream in streams:
    examples = tasks.request_stream(requests, stream, seed=seed)
    full = load(folder, dtype=dtype, **limits)
    if full.tokenizer is None:
      raise ValueError(f"{folder} has no tokenizer; the evaluation needs one")
    reqs = make_requests(full.tokenizer, examples)
    ref = run_stream(full, reqs)
    ref_lp = teacher_forced(full, reqs)
    configs = [("full", 100, "original")] if "full" in policies else []
    for pct in budgets:
      for policy in policies:
        if policy == "full":
          continue
        for gate in (gates if policy in GATED else ("original",)):
          configs.append((policy, pct, gate))
    for policy, pct, gate in configs:
      k = max(1, min(e, round(pct / 100 * e)))
      if policy == "full":
        model, res, lp, budget = full, ref, ref_lp, None
      else:
        budget = experts_budget(folder, k, dtype=dtype, **limits)
        model = load(folder, budget=budget, policy=policy, gate_mode=gate, dtype=dtype, **limits)
        res = run_stream(model, reqs)
        lp = teacher_forced(model, reqs)
      texts = [_decode_text(full.tokenizer, o) for o in res["outputs"]]
      tf_agree, tf_kl = fidelity(lp, ref_lp)
      s = model.stats.summary() if model.stats is not None else {}
      row = dict(stream=stream, policy=policy, gate=gate if policy in GATED else "-", expert_pct=pct,
                 slots=k if policy != "full" else e, experts=e, budget_bytes=budget, requests=len(reqs),
                 exact_match=float(np.mean([t == ex.answer for t, ex in zip(texts, examples)])),
                 agreement=agreement(res["outputs"], ref["outputs"]), tf_agreement=tf_agree, tf_kl=tf_kl,
                 ms_per_token=res["ms_per_token"], redirect_rate=s.get("redirect_rate"),
                 miss_rate=1 - s["hit_rate"] if s.get("hits", 0) + s.get("misses", 0) else None,
                 experts_swapped=s.get("experts_swapped"))
      rows.append(row)
      if progress:
        progress(row)
  return rows


def markdown(rows: list[dict]) -> str:
  head = ("| stream | policy | gate | experts resident | exact match | agreement w/ full | TF agreement | "
          "TF KL | ms/token | redirect | miss | swaps |")
  lines = [head, "|" + "---|" * 12]
  fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
  for r in rows:
    lines.append(
        f"| {r['stream']} | {r['policy']} | {r['gate']} | {r['slots']}/{r['experts']} ({r['expert_pct']}%) | "
        f"{100 * r['exact_match']:.1f}% | {100 * r['agreement']:.1f}% | {100 * r['tf_agreement']:.1f}% | "
        f"{r['tf_kl']:.4f} | {r['ms_per_token']:.2f} | {fmt(r['redirect_rate'] and 100 * r['redirect_rate'], '.1f')}"
        f"{'' if r['redirect_rate'] is None else '%'} | "
        f"{fmt(r['miss_rate'] and 100 * r['miss_rate'], '.1f')}{'' if r['miss_rate'] is None else '%'} | "
        f"{fmt(r['experts_swapped'], 'd')} |")
  return "\n".join(lines)


METRICS = {"exact_match": ("exact match (%)", 100), "agreement": ("token agreement with full (%)", 100),
           "tf_agreement": ("teacher-forced agreement with full (%)", 100),
           "tf_kl": ("mean KL(full || policy), teacher-forced", 1), "ms_per_token": ("decode ms / token", 1)}


def plot(rows: list[dict], path: str, metric: str = "exact_match") -> str | None:
  """`metric` (a key of METRICS) against resident expert fraction: one line per policy/gate, one panel per
  stream. Returns the path, or None without matplotlib."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
  label, scale = METRICS[metric]
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install -e \".[plot]\"): no plot", file=sys.stderr)
    return None
  streams = sorted({r["stream"] for r in rows})
  fig, axes = plt.subplots(1, len(streams), figsize=(6 * len(streams), 4.2), squeeze=False)
  for ax, stream in zip(axes[0], streams):
    sub = [r for r in rows if r["stream"] == stream]
    full = [r for r in sub if r["policy"] == "full"]
    if full:
      ax.axhline(scale * full[0][metric], color="k", ls="--", lw=1, label="full")
    for key in sorted({(r["policy"], r["gate"]) for r in sub if r["policy"] != "full"}):
      pts = sorted((r["expert_pct"], scale * r[metric]) for r in sub if (r["policy"], r["gate"]) == key)
      ax.plot(*zip(*pts), marker="o", label=key[0] if key[1] == "-" else f"{key[0]} ({key[1]})")
    ax.set_title(f"{stream} stream")
    ax.set_xlabel("resident experts per MoE layer (% of E)")
    ax.set_ylabel(label)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(rows: list[dict], out_dir: str, meta: dict) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"evaluation.{k}") for k in ("md", "json", "png")}
  with open(paths["md"], "w") as f:
    f.write(markdown(rows) + "\n")
  with open(paths["json"], "w") as f:
    json.dump(dict(meta, rows=rows), f, indent=1)
  if plot(rows, paths["png"]) is None:
    del paths["png"]
  return paths


def _csv(value: str, cast=str) -> tuple:
  return tuple(cast(v.strip().rstrip("%")) for v in value.split(",") if v.strip())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m swapmoe_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="converted checkpoint folder (default: the built-in model)")
  p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="expert-memory percentages")
  p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
  p.add_argument("--gates", default="original,renormalized")
  p.add_argument("--streams", default="runs,shuffled")
  p.add_argument("--requests", type=int, default=200, help="requests per stream")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16"))
  p.add_argument("--out", default="evaluation", help="folder for evaluation.{md,json,png}")
  a = p.parse_args(argv)
  try:
    budgets = _csv(a.budgets, float)
    budgets = tuple(int(b) if b == int(b) else b for b in budgets)
    if not budgets or any(not 0 < b <= 100 for b in budgets):
      raise ValueError(f"--budgets must be percentages in (0, 100], got {a.budgets!r}")
    from swapmoe_jax.loader import POLICIES
    policies = _csv(a.policies)
    bad = set(policies) - set(POLICIES)
    if bad:
      raise ValueError(f"unknown policy {sorted(bad)}; supported: {', '.join(POLICIES)}")
    if a.requests < 1:
      raise ValueError("--requests must be >= 1")
    if a.model:
      folder = a.model
    else:
      from swapmoe_jax.demo import default_checkpoint
      folder = default_checkpoint()
    t0 = time.time()
    show = lambda r: print(  # noqa: E731
        f"{r['stream']:9s} {r['policy']:8s} {r['gate']:13s} {r['slots']:3d}/{r['experts']} "
        f"EM {100 * r['exact_match']:5.1f}%  agree {100 * r['agreement']:5.1f}%  KL {r['tf_kl']:.4f}",
        file=sys.stderr, flush=True)
    rows = evaluate(folder, budgets=budgets, policies=policies, gates=_csv(a.gates), streams=_csv(a.streams),
                    requests=a.requests, seed=a.seed, dtype=a.dtype, progress=show)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax
  meta = dict(model=os.path.abspath(folder), command="python -m swapmoe_jax.evaluate " + " ".join(argv or sys.argv[1:]),
              device=jax.devices()[0].device_kind, seconds=round(time.time() - t0, 1))
  paths = write_report(rows, a.out, meta)
  print(markdown(rows))
  print("wrote " + ", ".join(paths.values()), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
