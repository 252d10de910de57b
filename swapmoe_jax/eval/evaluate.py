"""Accuracy against memory budget: exact match and agreement with `full`, per policy and gate option.

  python -m swapmoe_jax.evaluate                       # the built-in model, the default grid
  python -m swapmoe_jax.evaluate --budgets 100,33 --policies swapmoe,pruned --requests 50 --out /tmp/ev
  python -m swapmoe_jax.evaluate --experts 3,5 --policies full,swapmoe,pruned,oracle --streams runs

Budgets are resident experts per MoE layer: `--experts 2,3,5` directly, or `--budgets` as fractions of
*expert* memory, K = round(f * E) (at least 1), with the rest of the model (dense weights, caches,
staging, workspace) accounted for as usual (`load(..., experts=K)`). Requests
come one at a time (batch 1) from a stream of held-out task prompts (`tasks.request_stream`): "runs"
(a family for several requests in a row, as in a user's session) or "shuffled". For each (stream,
budget, policy, gate) it measures:
- exact match against the task's answer (checkable by construction);
- token agreement of the generated ids with `full` on the same requests;
- under teacher forcing on given text (model-agnostic fidelity): next-token argmax agreement with
  `full` and the mean KL(full || model) of the next-token distributions;
- decode time per token, redirect rate (masked policies), miss rate (exact policies), experts swapped;
- paired differences of exact match on the same requests, with 95 % bootstrap intervals
  (`eval/paired.py`): each row against `full`, and masked rows against `pruned` at the same K and gate.
  The bootstrap resamples distinct prompts (a cluster bootstrap: a long stream repeats the prompts of
  the held-out space's smaller families, and a repeat is not a new draw); each row records how many
  distinct prompts its requests hold (`prompts`).
Policy `oracle` (evaluation only, `eval/oracle.py`) is the ceiling of masked routing: per task family
the static top-K_l set of the experts `full` routed that family's requests to in this stream
(hindsight), pinned at every change of family under `pruned`'s masked routing (the pins are not
timed; their copies count as swaps). With it, swapmoe rows also get their difference with the oracle
(`vs_oracle`) and the fraction of the oracle's gain over pruned they capture (`captured`), and the
report a second table (`oracle.bound`).
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

from swapmoe_jax.builtin import tasks
from swapmoe_jax.eval import oracle as oracle_lib
from swapmoe_jax.eval.paired import gain_ratio, paired_difference
from swapmoe_jax.eval.requests import Request, make_requests, run_stream

DEFAULT_BUDGETS = (100, 75, 50, 33, 25, 15)
DEFAULT_POLICIES = ("full", "swapmoe", "pruned", "lru", "lfu")
EVAL_ONLY_POLICIES = ("oracle",)  # not a serving policy: masked routing with per-family pins in hindsight
GATED = ("swapmoe", "pruned", "oracle", "selective")  # the gate option only matters for masked routing
SRC_LEN, NEW_TOKENS = 32, 24


def _decode_text(tokenizer, ids) -> str:
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


def teacher_forced(model, requests: list[Request], before=None) -> list[np.ndarray]:
  """Next-token log-probabilities float32 [T, V] per request, under teacher forcing on the answers.
  before: optional callable (i, i + 1) called before request i (as `run_stream`'s before_batch)."""
  cfg = model.config
  out = []
  for i, r in enumerate(requests):
    if before is not None:
      before(i, i + 1)
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
             dtype: str | None = None, progress=None, experts=None, thresholds=(None,),
             prefill_refit: float | None = None, fallback_bits: int | None = None,
             prompt_residency: bool | None = None, selective_encoder: bool = True) -> list[dict]:
  """The evaluation grid; one row per (stream, budget, policy, gate). See the module docstring.

  `experts`: resident experts per MoE layer to evaluate (K values); when given, `budgets` (percentages
  of E) is not used. `thresholds`: the selective policy's thresholds, a row each (None: its default).
  `prefill_refit`: `load`'s prefill-informed residency for the swapmoe, selective and fallback rows;
  `prompt_residency`: `load`'s prompt residency for those rows (None: the loader's default, on for swapmoe).
  `fallback_bits`: the fallback rows' copies (`load`'s fallback_bits; default 8). `selective_encoder`:
  `load`'s for the selective rows (False: the encoder's misses are redirected, the decoder's served by
  the threshold)."""
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving.loader import load

  meta = ckpt.read_metadata(folder)
  e = meta.config.num_experts
  if experts is not None:
    if not experts or any(not 1 <= int(k) <= e for k in experts):
      raise ValueError(f"experts must be resident experts per layer in [1, {e}], got {list(experts)}")
    sizes = [(round(100 * int(k) / e, 1), int(k)) for k in experts]
  else:
    sizes = [(pct, max(1, min(e, round(pct / 100 * e)))) for pct in budgets]
  limits = dict(max_batch_size=1, max_source_len=SRC_LEN, max_new_tokens=NEW_TOKENS)
  rows = []
  groups = {}
  for stream in streams:
    examples = tasks.request_stream(requests, stream, seed=seed)
    groups[stream] = [ex.prompt for ex in examples]
    full = load(folder, dtype=dtype, **limits)
    if full.tokenizer is None:
      raise ValueError(f"{folder} has no tokenizer; the evaluation needs one")
    reqs = make_requests(full.tokenizer, [(ex.prompt, ex.answer) for ex in examples], src_len=SRC_LEN,
                         tgt_len=NEW_TOKENS)
    wanted = oracle_lib.WantedRecorder(full)  # full's routing per request: the oracle's hindsight
    ref = run_stream(full, reqs, max_new_tokens=NEW_TOKENS, after_batch=wanted)
    ref_lp = teacher_forced(full, reqs)
    families = [ex.family for ex in examples]
    configs = [("full", 100, e, "original", None)] if "full" in policies else []
    for pct, k in sizes:
      for policy in policies:
        if policy == "full":
          continue
        for gate in (gates if policy in GATED else ("original",)):
          for t in (thresholds if policy == "selective" else (None,)):
            configs.append((policy, pct, k, gate, t))
    for policy, pct, k, gate, threshold in configs:
      extra = {}
      if policy == "full":
        model, res, lp, budget = full, ref, ref_lp, None
      else:
        kw = {} if threshold is None else {"selective_threshold": threshold}
        if prefill_refit is not None and policy in ("swapmoe", "selective", "fallback"):
          kw["prefill_refit"] = extra["prefill_refit"] = prefill_refit
        if prompt_residency is not None and policy in ("swapmoe", "selective", "fallback"):
          kw["prompt_residency"] = extra["prompt_residency"] = prompt_residency
        if fallback_bits is not None and policy == "fallback":
          kw["fallback_bits"] = extra["fallback_bits"] = fallback_bits
        if not selective_encoder and policy == "selective":
          kw["selective_encoder"] = extra["selective_encoder"] = False
        model = load(folder, experts=k, policy="pruned" if policy == "oracle" else policy, gate_mode=gate,
                     dtype=dtype, **kw, **limits)
        if policy == "selective":
          from swapmoe_jax.moe.layer import DEFAULT_SELECTIVE_THRESHOLD
          extra["threshold"] = DEFAULT_SELECTIVE_THRESHOLD if threshold is None else threshold
        budget = int(model.plan.budget_bytes)
        pin = None
        if policy == "oracle":
          sets = oracle_lib.family_resident(wanted.per_request, families, model.plan.slots_per_layer)
          pin = oracle_lib.FamilyPinner(model, families, sets)
          extra["oracle_resident"] = {f: [s.tolist() for s in layers] for f, layers in sorted(sets.items())}
        res = run_stream(model, reqs, max_new_tokens=NEW_TOKENS, before_batch=pin)
        lp = teacher_forced(model, reqs, before=pin)
        if pin is not None:
          extra["pins"] = pin.pins
      texts = [_decode_text(full.tokenizer, o) for o in res["outputs"]]
      tf_agree, tf_kl = fidelity(lp, ref_lp)
      s = model.stats.summary() if model.stats is not None else {}
      correct = [int(t == ex.answer) for t, ex in zip(texts, examples)]
      row = dict(stream=stream, policy=policy, gate=gate if policy in GATED else "-", expert_pct=pct,
                 slots=k, experts=e, budget_bytes=budget, requests=len(reqs), prompts=len(set(groups[stream])),
                 exact_match=float(np.mean(correct)), correct=correct,
                 agreement=agreement(res["outputs"], ref["outputs"]), tf_agreement=tf_agree, tf_kl=tf_kl,
                 ms_per_token=res["ms_per_token"], redirect_rate=s.get("redirect_rate"),
                 miss_rate=1 - s["hit_rate"] if s.get("hits", 0) + s.get("misses", 0) else None,
                 experts_swapped=s.get("experts_swapped"),
                 bank_rate=s["from_bank"] / s["tokens_routed"] if s.get("tokens_routed") else None, **extra)
      rows.append(row)
      if progress:
        progress(row)
  add_comparisons(rows, groups)
  return rows


def add_comparisons(rows: list[dict], groups: dict | None = None) -> None:
  """Adds to each row its paired exact-match difference with `full` (`vs_full`) and, for masked
  policies other than `pruned`, with `pruned` at the same stream, K and gate (`vs_pruned`): dicts of
  eval.paired.PairedDifference's fields, or None where the other row is missing. A swapmoe row with an
  oracle row at the same stream, K and gate also gets `vs_oracle` and `captured` (eval.paired.GainRatio's
  fields: the fraction of the oracle's gain over pruned that swapmoe captures). groups: optional
  {stream: a label per request} (its prompt), for intervals that resample whole groups."""
  def find(stream, policy, k=None, gate=None):
    for r in rows:
      if (r["stream"], r["policy"]) == (stream, policy) and (k is None or r["slots"] == k) and (
          gate is None or r["gate"] == gate):
        return r
    return None

  for r in rows:
    cluster = dict(groups=(groups or {}).get(r["stream"]))
    full = find(r["stream"], "full")
    pruned = find(r["stream"], "pruned", r["slots"], r["gate"]) if r["policy"] not in ("full", "pruned") else None
    for key, other in (("vs_full", full if r["policy"] != "full" else None), ("vs_pruned", pruned)):
      r[key] = None if other is None else dataclasses.asdict(paired_difference(r["correct"], other["correct"], **cluster))
    oracle = find(r["stream"], "oracle", r["slots"], r["gate"]) if r["policy"] == "swapmoe" else None
    if oracle is not None:
      r["vs_oracle"] = dataclasses.asdict(paired_difference(r["correct"], oracle["correct"], **cluster))
      r["captured"] = None if pruned is None else dataclasses.asdict(
          gain_ratio(r["correct"], oracle["correct"], pruned["correct"], **cluster))


def row_label(r: dict) -> str:
  """A row's policy as the tables name it: with its threshold, and "decoder" when only the decoder's misses
  are served (selective_encoder False)."""
  label = r["policy"] + (f" {r['threshold']:g}" if r.get("threshold") is not None else "")
  return label + (" decoder" if r.get("selective_encoder") is False else "")


def markdown(rows: list[dict]) -> str:
  head = ("| stream | policy | gate | experts resident | exact match | agreement w/ full | TF agreement | "
          "TF KL | ms/token | redirect | miss | swaps | EM − full [95% CI] | EM − pruned [95% CI] |")
  lines = [head, "|" + "---|" * 14]
  prompts = {(r["requests"], r.get("prompts")) for r in rows}
  pp = lambda d: "—" if not d else f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"  # noqa: E731
  fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
  for r in rows:
    lines.append(
        f"| {r['stream']} | {row_label(r)} | {r['gate']} | {r['slots']}/{r['experts']} ({r['expert_pct']}%) | "
        f"{100 * r['exact_match']:.1f}% | {100 * r['agreement']:.1f}% | {100 * r['tf_agreement']:.1f}% | "
        f"{r['tf_kl']:.4f} | {r['ms_per_token']:.2f} | {fmt(r['redirect_rate'] and 100 * r['redirect_rate'], '.1f')}"
        f"{'' if r['redirect_rate'] is None else '%'} | "
        f"{fmt(r['miss_rate'] and 100 * r['miss_rate'], '.1f')}{'' if r['miss_rate'] is None else '%'} | "
        f"{fmt(r['experts_swapped'], 'd')} | {pp(r.get('vs_full'))} | {pp(r.get('vs_pruned'))} |")
  if all(p is not None for _, p in prompts):
    lines += ["", "Intervals: paired bootstrap over distinct prompts (" + "; ".join(
        f"{n} requests, {p} distinct prompts" for n, p in sorted(prompts)) + ")."]
  bound = oracle_lib.bound(rows)
  if bound:
    lines += ["", "Oracle bound (per-family top-K_l of full's routing, in hindsight); captured = "
              "(swapmoe − pruned) / (oracle − pruned):", "", oracle_lib.markdown(bound)]
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
    json.dump(dict(meta, rows=rows, oracle_bound=oracle_lib.bound(rows)), f, indent=1)
  if plot(rows, paths["png"]) is None:
    del paths["png"]
  return paths


def _csv(value: str, cast=str) -> tuple:
  return tuple(cast(v.strip().rstrip("%")) for v in value.split(",") if v.strip())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m swapmoe_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="converted checkpoint folder (default: the built-in model)")
  size = p.add_mutually_exclusive_group()
  size.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="expert-memory percentages")
  size.add_argument("--experts", help="resident experts per MoE layer, e.g. 2,3,4,5,8 (instead of --budgets)")
  p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
  p.add_argument("--gates", default="original,renormalized")
  p.add_argument("--thresholds", help="the selective policy's thresholds, a row each, e.g. 0.1,0.3,0.6 "
                                      "(default: its default)")
  p.add_argument("--streams", default="runs,shuffled")
  p.add_argument("--fallback-bits", type=int, choices=(4, 8), help="the fallback rows' copies (default 8)")
  p.add_argument("--prefill-refit", type=float, metavar="F",
                 help="prefill-informed residency for swapmoe/selective/fallback rows (load's prefill_refit)")
  p.add_argument("--prompt-residency", nargs="?", choices=["on", "off"], const="on", default=None,
                 help="residents predicted from the prompt's tokens for swapmoe/selective/fallback rows "
                      "(load's prompt_residency; default: the loader's, on for swapmoe)")
  p.add_argument("--selective-encoder", choices=["on", "off"], default="on",
                 help="off: the selective rows redirect the encoder's misses and serve only the decoder's "
                      "(load's selective_encoder)")
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
    from swapmoe_jax.serving.loader import POLICIES
    policies = _csv(a.policies)
    bad = set(policies) - set(POLICIES) - set(EVAL_ONLY_POLICIES)
    if bad:
      raise ValueError(f"unknown policy {sorted(bad)}; supported: {', '.join(POLICIES + EVAL_ONLY_POLICIES)}")
    if a.requests < 1:
      raise ValueError("--requests must be >= 1")
    if a.model:
      folder = a.model
    else:
      from swapmoe_jax.builtin.demo import default_checkpoint
      folder = default_checkpoint()
    t0 = time.time()
    show = lambda r: print(  # noqa: E731
        f"{r['stream']:9s} {row_label(r):13s} {r['gate']:13s} {r['slots']:3d}/{r['experts']} "
        f"EM {100 * r['exact_match']:5.1f}%  agree {100 * r['agreement']:5.1f}%  KL {r['tf_kl']:.4f}",
        file=sys.stderr, flush=True)
    experts = None if a.experts is None else _csv(a.experts, int)
    rows = evaluate(folder, budgets=budgets, policies=policies, gates=_csv(a.gates), streams=_csv(a.streams),
                    requests=a.requests, seed=a.seed, dtype=a.dtype, progress=show, experts=experts,
                    thresholds=(None,) if a.thresholds is None else _csv(a.thresholds, float),
                    prefill_refit=a.prefill_refit, fallback_bits=a.fallback_bits,
                    prompt_residency=None if a.prompt_residency is None else a.prompt_residency == "on",
                    selective_encoder=a.selective_encoder == "on")
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
