"""Long-run soak: thousands of decode steps with swapping active; compiles, memory and outputs over time.

  python benchmarks/soak.py --steps 10000 --policy swapmoe lfu                     # demo model, CPU
  python benchmarks/soak.py --steps 20000 --policy swapmoe lfu --shape switch-base-8 --dtype bfloat16

Each policy runs in a fresh subprocess. A stream of generate requests (random prompts of random real
length padded to `--src-len`, greedy and sampled alternately, `--new-tokens` each) runs under a budget
that holds `--experts-fraction` of the experts (or `--budget`), so the policy keeps swapping. Every
`--every` decode steps a checkpoint records: XLA compilations so far, host RSS, device bytes in use
(where the backend reports them), experts swapped, and four equalities, all of which must hold
(with `--checks end`, `fresh` and `slots` run at the last checkpoint only):
  twin   every request's tokens equal a second model of the same policy and budget, built fresh and
         fed the same requests, but synchronised at every device call (outputs do not depend on
         timing);
  full   for exact policies (lru, lfu), every request's tokens equal the `full` model's. Held bit for
         bit on the CPU only: on a GPU, two programs computing the same function round differently
         (`full` against itself on the request duplicated into a batch of two moved bfloat16 logits
         by up to 1.9 on an H200, `exact_parity.py`), and over 64 greedy tokens a near tie can flip.
         There the share of requests and tokens that agree is recorded, not judged; exact routing's
         distance to `full` is measured against that noise floor by `exact_parity.py`;
  fresh  teacher-forced logits of the soaked model equal, bit for bit, those of a model built fresh
         with the resident set the controller reports (no drift in the slot buffers);
  slots  every slot holds, byte for byte, the host store's copy of the expert the controller names.
After the warm-up (`--warmup-steps`), the compile count must not grow; RSS must not grow by more
than `--rss-tolerance-mib` nor keep climbing over the second half of the run (fitted slope at most
`--rss-slope-tolerance-mib` per 10,000 steps), measured after handing free heap back to the OS
(glibc `malloc_trim`) so that malloc's caching does not read as growth; device memory in use must
not grow by more than `--device-tolerance-mib`. Exit status 1 if anything fails.

Writes `<out>-<policy>.jsonl` (one row per checkpoint and a summary row) and `<out>.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
MiB = 2**20

_COMPILES = [0]


def _count_compiles(name, _duration, **_):
  if name == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


def _release_free_heap() -> None:
  """Hands free heap pages back to the OS (glibc `malloc_trim`), so RSS counts memory the process
  holds rather than what malloc's arenas cache: on a 2-core CPU machine, 3,750 requests of the
  built-in model left RSS wandering between 711 and 720 MiB without it and at exactly 598.2 MiB with
  it. Without glibc, a no-op."""
  import ctypes
  import gc

  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def rss_bytes() -> int:
  """Resident set size of this process now, after releasing free heap (Linux /proc; elsewhere the
  peak, from getrusage)."""
  _release_free_heap()
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_bytes(device) -> tuple[int | None, int | None]:
  """(bytes in use, peak bytes in use) on `device`, or (None, None) where the backend does not say."""
  try:
    s = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without statistics raise various errors
    s = {}
  return s.get("bytes_in_use"), s.get("peak_bytes_in_use")


# --- models ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
  model: object  # the soaked SwitchModel
  twin: object  # same policy and budget, fed the same requests, synchronised every step
  full: object | None  # the full model, for exact policies
  dense: dict  # the dense tree, for fresh builds
  budget_bytes: int
  source: str


def _budget_bytes(args, cfg, dbytes) -> int:
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import decode

  if args.budget:
    return budget_lib.parse_budget(args.budget).resolve(budget_lib.full_model_bytes(cfg, dbytes))
  k = max(1, int(args.experts_fraction * cfg.num_experts))
  return budget_lib.memory_breakdown(cfg, dbytes, [k] * cfg.num_moe_layers, args.batch, args.src_len,
                                     decode.cache_length(args.new_tokens), args.max_swaps).total


def build_models(args, policy) -> Models:
  """The soaked model, its twin and (exact policies) the full model: from `--model` through `load`,
  or from `--shape` with random weights (benchmarks/shapes.py) through the planner and `assemble`."""
  import jax.numpy as jnp

  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import decode, loader
  from swapmoe_jax.serving.residency import EXACT_POLICIES

  exact = policy in EXACT_POLICIES
  shape = dict(max_batch_size=args.batch, max_source_len=args.src_len, max_new_tokens=args.new_tokens)
  cadence = dict(update_every=args.update_every, max_swaps_per_step=args.max_swaps)
  if args.shape is None:
    import swapmoe_jax

    folder = args.model or swapmoe_jax.default_checkpoint()
    meta = ckpt.read_metadata(folder)
    dtype = args.dtype or meta.dtype
    budget = _budget_bytes(args, meta.config, jnp.dtype(loader.DTYPES[dtype]).itemsize)
    def make():
      return swapmoe_jax.load(folder, budget=budget, policy=policy, dtype=dtype, staging=args.staging, **shape,
                              **cadence)

    full = swapmoe_jax.load(folder, dtype=dtype, **shape) if exact else None
    return Models(make(), make(), full, ckpt.restore_dense(meta), budget, folder)
  import random_model
  from shapes import SHAPES

  cfg = dataclasses.replace(SHAPES[args.shape], eos_token_ids=(-1,))  # random weights: never stop early
  dtype = args.dtype or "bfloat16"
  budget = _budget_bytes(args, cfg, jnp.dtype(loader.DTYPES[dtype]).itemsize)
  request = dict(batch=args.batch, src_len=args.src_len, new_tokens=args.new_tokens)
  limits = dict(batch=args.batch, src_len=args.src_len, tgt_len=decode.cache_length(args.new_tokens))
  parts = random_model.random_model_parts(cfg, dtype)

  def make(pol=policy, b=budget):
    return random_model.build(cfg, dtype, pol, b, **request, update_every=args.update_every, max_swaps=args.max_swaps,
                              parts=parts, limits=limits, staging=args.staging).model

  full = make("full", None) if exact else None
  return Models(make(), make(), full, parts[0], budget, f"{args.shape} (random weights, {dtype})")


# --- checks ------------------------------------------------------------------------------------------


class FreshBuild:
  """Teacher-forced logits of a model built fresh with a given resident set, against the soaked one's."""

  def __init__(self, models: Models, rng):
    from swapmoe_jax.serving.loader import routing_of

    m = models.model
    self.m, self.dense = m, models.dense
    self.routing = routing_of(m.policy)
    b, s = m.limits["batch"], m.limits["src_len"]
    self.ids = rng.integers(2, m.config.vocab_size, (b, s)).astype(np.int32)
    self.mask = np.ones((b, s), bool)
    self.dec = rng.integers(2, m.config.vocab_size, (b, 4)).astype(np.int32)
    self.dec[:, 0] = m.config.decoder_start_token_id
    self.graphdef = None  # the first fresh build's, reused: the same program every time

  def __call__(self) -> bool:
    from swapmoe_jax.serving import decode, loader

    m = self.m
    resident = [np.asarray(s) for s in m.residency.controller.state.slot_expert]
    graphdef, params, slots = loader.build_model(m.config, self.dense, m.store, dtype=m.dtype,
                                                 slots_per_layer=m.plan.slots_per_layer, resident=resident,
                                                 routing=self.routing)
    if self.graphdef is None:
      self.graphdef = decode.Static(graphdef, m._graphdef.precision)  # noqa: SLF001
    inputs = (self.ids, self.mask, self.dec, None, m._banks)  # noqa: SLF001
    ours = decode.forward(m._graphdef, m._params, m._slots, *inputs)[0]  # noqa: SLF001
    fresh = decode.forward(self.graphdef, decode.Flat.of(params), decode.Flat.of(slots), *inputs)[0]
    return bool(np.array_equal(np.asarray(ours), np.asarray(fresh)))


def _host_copy(x) -> np.ndarray:
  """A host copy of device array `x` that `x` does not keep: `np.asarray(x)` caches the copy in `x`
  for as long as `x` lives, and the slot buffers live until the next swap replaces them, so reading
  them directly held ~3.4 GiB of switch-base-64's slots in host memory at each checkpoint's RSS
  reading (an H200 soak, session 31), there or not depending on whether a swap had come since."""
  import jax.numpy as jnp

  return np.asarray(jnp.copy(x))


def slots_agree(m) -> bool:
  """Every slot holds the store's copy of the expert the controller names; index maps are the controller's."""
  from flax import nnx

  pure = nnx.to_pure_dict(m.slots)
  state = m.residency.controller.state
  for layer, (stack, i) in enumerate(m.config.moe_layers):
    moe = pure[stack]["blocks"][i]["moe"]
    filled = state.slot_expert[layer]
    # `store.expert` reads without changing the store's layout (`store.wi` would build the stacked
    # banks and switch swaps to another staging program: a compile the soak once counted as its own).
    wi, wo = (np.stack(x) for x in zip(*(m.store.expert(layer, e) for e in filled)))
    if not (np.array_equal(_host_copy(moe["slot_of"]), state.index_map(layer))
            and np.array_equal(_host_copy(moe["wi"]), wi) and np.array_equal(_host_copy(moe["wo"]), wo)):
      return False
  return True


def run_checks(fresh, m, bad: dict) -> None:
  bad["fresh"] += not fresh()
  bad["slots"] += not slots_agree(m)


# --- one policy --------------------------------------------------------------------------------------


def run_one(args, policy) -> dict:
  import jax
  import random_model

  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  t0 = time.perf_counter()
  models = build_models(args, policy)
  m, cfg = models.model, models.model.config
  device = next(iter(m._params.leaves[0].devices()))  # noqa: SLF001
  rng = np.random.default_rng(args.seed)
  fresh = FreshBuild(models, rng)
  out_path = f"{args.out}-{policy}.jsonl"
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  rows = []
  bad = dict(twin=0, full=0, fresh=0, slots=0)
  agree = [0, 0, 0]  # against `full`: requests equal, tokens equal, tokens compared
  exact_full = device.platform == "cpu"  # see the module docstring
  steps = requests = 0
  next_at, baseline = args.warmup_steps, None
  setup_s = time.perf_counter() - t0
  t_start = time.perf_counter()
  with open(out_path, "w") as f:
    while True:
      ids, mask = random_model.random_prompts(rng, cfg, args.batch, args.src_len, ragged=True)
      sampling = dict(temperature=0.8, top_k=20, seed=requests) if requests % 2 else {}
      out = m.generate(ids, mask, max_new_tokens=args.new_tokens, **sampling)
      if args.twin:
        bad["twin"] += not np.array_equal(out, models.twin.generate(ids, mask, max_new_tokens=args.new_tokens,
                                                                    stream=lambda s, t: None, **sampling))
      if models.full is not None:
        ref = models.full.generate(ids, mask, max_new_tokens=args.new_tokens, **sampling)
        same = out.shape == ref.shape and np.array_equal(out, ref)
        n = min(out.shape[1], ref.shape[1])
        agree[0] += same
        agree[1] += int(np.sum(out[:, :n] == ref[:, :n]))
        agree[2] += int(max(out.shape[1], ref.shape[1]) * out.shape[0])
        bad["full"] += not same and exact_full
      steps += out.shape[1]
      requests += 1
      if steps < next_at:
        continue
      last = steps >= args.steps + args.warmup_steps
      # `--checks end`: at the warm-up checkpoint (so that the fresh build's compilation and whatever it
      # keeps are in the baseline) and after the last checkpoint's readings, nowhere between.
      checks_after = args.checks == "end" and last
      if args.checks == "every" or (baseline is None and not checks_after):
        run_checks(fresh, m, bad)
      jax.block_until_ready(m._slots.leaves)  # noqa: SLF001
      in_use, peak = device_bytes(device)
      rss = rss_bytes()
      if checks_after:
        run_checks(fresh, m, bad)
      summary = m.stats.summary()
      row = dict(kind="checkpoint", policy=policy, step=steps, requests=requests,
                 elapsed_s=round(time.perf_counter() - t_start, 3), compiles=_COMPILES[0], rss_bytes=rss,
                 device_bytes_in_use=in_use, device_peak_bytes=peak, experts_swapped=summary["experts_swapped"],
                 mismatches=dict(bad), warmup=baseline is None)
      if baseline is None:
        baseline = row
      rows.append(row)
      f.write(json.dumps(row) + "\n")
      f.flush()
      print(f"  {policy:>8} step {steps:>6}  compiles {row['compiles']:>3}  rss {row['rss_bytes'] / MiB:8.1f} MiB  "
            f"device {_mib(in_use)}  swapped {row['experts_swapped']:>6}  mismatches {sum(bad.values())}",
            flush=True)
      if last:
        break
      next_at = steps + args.every
    result = summarize(args, policy, rows, baseline, bad, models, device, setup_s)
    if models.full is not None:
      result.update(full_requests_equal=agree[0], full_token_agreement=agree[1] / max(agree[2], 1),
                    full_judged=exact_full)
    f.write(json.dumps(result) + "\n")
  return result


def _mib(n):
  return "     n/a" if n is None else f"{n / MiB:8.1f} MiB"


def summarize(args, policy, rows, baseline, bad, models, device, setup_s) -> dict:
  """The verdict: equalities, compiles after warm-up, RSS and device memory growth against tolerances."""
  after = [r for r in rows if not r["warmup"]]
  rss_growth = float(max(r["rss_bytes"] for r in after) - baseline["rss_bytes"]) if after else 0.0
  # The trend over the second half: allocator pools and bounded histories fill early and then stay;
  # a leak keeps climbing (kept telemetry records once did, ~1.5 MiB per 10,000 steps).
  late = after[len(after) // 2:]
  slope = None
  if len(late) >= 3:
    fit = np.polyfit([r["step"] for r in late], [float(r["rss_bytes"]) for r in late], 1)
    slope = float(fit[0]) * 10_000  # bytes per 10k steps
  dev = [r["device_bytes_in_use"] for r in after]
  dev_growth = None if baseline["device_bytes_in_use"] is None or not dev else \
      max(dev) - baseline["device_bytes_in_use"]
  failures = [f"{k}: {v} mismatching checks" for k, v in bad.items() if v]
  new_compiles = rows[-1]["compiles"] - baseline["compiles"]
  if new_compiles:
    failures.append(f"{new_compiles} compilations after the warm-up")
  if rss_growth > args.rss_tolerance_mib * MiB:
    failures.append(f"RSS grew {rss_growth / MiB:.1f} MiB > {args.rss_tolerance_mib} MiB")
  if slope is not None and slope > args.rss_slope_tolerance_mib * MiB:
    failures.append(f"RSS still climbs {slope / MiB:.2f} MiB per 10k steps over the second half "
                    f"> {args.rss_slope_tolerance_mib}")
  if dev_growth is not None and dev_growth > args.device_tolerance_mib * MiB:
    failures.append(f"device memory grew {dev_growth / MiB:.1f} MiB > {args.device_tolerance_mib} MiB")
  m = models.model
  summary = m.stats.summary()
  return dict(
      kind="summary", policy=policy, source=models.source, device=device.device_kind, platform=device.platform,
      steps_after_warmup=rows[-1]["step"] - baseline["step"], warmup_steps=baseline["step"],
      requests=rows[-1]["requests"], seconds=rows[-1]["elapsed_s"], setup_s=round(setup_s, 1),
      budget_bytes=models.budget_bytes, slots_per_layer=list(m.plan.slots_per_layer), num_experts=m.config.num_experts,
      compiles_at_warmup=baseline["compiles"], compiles_at_end=rows[-1]["compiles"],
      rss_at_warmup=baseline["rss_bytes"], rss_growth_bytes=rss_growth, rss_slope_bytes_per_10k_steps=slope,
      device_in_use_at_warmup=baseline["device_bytes_in_use"], device_growth_bytes=dev_growth,
      device_peak_bytes=rows[-1]["device_peak_bytes"], experts_swapped=summary["experts_swapped"],
      hit_rate=summary.get("hit_rate"), redirect_rate=summary.get("redirect_rate"), mismatches=bad,
      checkpoints=len(rows), rss_tolerance_mib=args.rss_tolerance_mib,
      rss_slope_tolerance_mib=args.rss_slope_tolerance_mib, device_tolerance_mib=args.device_tolerance_mib,
      commit=_commit(), args={k: v for k, v in vars(args).items() if k != "run"}, ok=not failures, failures=failures)


def _commit():
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=HERE,
                                   stderr=subprocess.DEVNULL).strip()
  except Exception:  # noqa: BLE001 - not a checkout
    return None


# --- report --------------------------------------------------------------------------------------------


def plot(args, policies) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[plot]'): no figure", file=sys.stderr)
    return None
  fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
  for policy in policies:
    rows = [json.loads(line) for line in open(f"{args.out}-{policy}.jsonl")]
    cps = [r for r in rows if r["kind"] == "checkpoint"]
    x = [r["step"] for r in cps]
    axes[0].plot(x, [r["compiles"] for r in cps], marker=".", label=policy)
    # Growth since the warm-up checkpoint: policies with RSS 9 GiB apart share one readable scale.
    axes[1].plot(x, [(r["rss_bytes"] - cps[0]["rss_bytes"]) / MiB for r in cps], marker=".", label=policy)
    if cps[0]["device_bytes_in_use"] is not None:
      axes[2].plot(x, [(r["device_bytes_in_use"] - cps[0]["device_bytes_in_use"]) / MiB for r in cps], marker=".",
                   label=policy)
  axes[2].text(0.5, 0.5, "" if axes[2].lines else "device memory: n/a on this backend", ha="center",
               transform=axes[2].transAxes)
  for ax in [a for a in axes[1:] if a.lines]:  # at least 16 MiB of range: page-sized noise is no trend
    lo, hi = ax.get_ylim()
    mid = (lo + hi) / 2
    ax.set_ylim(min(lo, mid - 8), max(hi, mid + 8))
  for ax, label in zip(axes, ("XLA compilations", "host RSS growth (MiB)", "device memory growth (MiB)")):
    ax.set_ylabel(label)
    ax.axvline(args.warmup_steps, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
  axes[0].legend()
  axes[2].set_xlabel("decode steps (dashed: end of warm-up)")
  fig.suptitle(f"soak: {', '.join(policies)}")
  fig.tight_layout()
  path = f"{args.out}.png"
  fig.savefig(path, dpi=110)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=10_000, help="decode steps after the warm-up (default 10000)")
  p.add_argument("--warmup-steps", type=int, default=1000)
  p.add_argument("--every", type=int, default=1000, help="decode steps between checkpoints")
  p.add_argument("--policy", nargs="+", default=["swapmoe", "lfu"])
  p.add_argument("--model", metavar="FOLDER", help="converted checkpoint (default: the built-in model)")
  p.add_argument("--shape", help="a shape of benchmarks/shapes.py with random weights, instead of --model")
  p.add_argument("--dtype", choices=("float32", "bfloat16"))
  p.add_argument("--budget", help="e.g. 40%% or 2GiB (default: what holds --experts-fraction of the experts)")
  p.add_argument("--experts-fraction", type=float, default=0.5)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--src-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--update-every", type=int, default=4)
  p.add_argument("--max-swaps", type=int, default=2)
  p.add_argument("--staging", choices=("auto", "pageable", "transfer", "gather"), default="auto",
                 help="how swaps copy experts to the device (see `load`)")
  p.add_argument("--no-twin", dest="twin", action="store_false", help="skip the twin replay (halves the work)")
  p.add_argument("--checks", choices=("every", "end"), default="end",
                 help="run the fresh-build and slot checks at every checkpoint, or (default) at the warm-up and "
                      "after the last readings: `end` keeps their host allocations out of the RSS readings")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rss-tolerance-mib", type=float, default=16.0,
                 help="largest RSS growth after the warm-up (default 16)")
  p.add_argument("--rss-slope-tolerance-mib", type=float, default=0.5,
                 help="largest RSS trend over the second half, MiB per 10k steps (default 0.5)")
  p.add_argument("--device-tolerance-mib", type=float, default=16.0)
  p.add_argument("--out", default=os.path.join(HERE, "soak", "soak"), help="prefix of the output files")
  p.add_argument("--replot", action="store_true", help="only redraw <out>.png from the JSON lines")
  p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one policy in this process
  args = p.parse_args(argv)
  if args.replot:
    print(plot(args, args.policy))
    return 0
  if args.run:
    result = run_one(args, args.run)
    print("RESULT " + json.dumps(result), flush=True)
    return 0
  results = []
  for policy in args.policy:
    cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--run", policy]
    print(f"{policy}: {args.steps} decode steps after {args.warmup_steps} of warm-up ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ,
                                                                             XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
    if proc.returncode or not lines:
      results.append(dict(policy=policy, ok=False, failures=[f"run failed with status {proc.returncode}"]))
      continue
    results.append(json.loads(lines[-1][7:]))
  figure = plot(args, [r["policy"] for r in results if "steps_after_warmup" in r])
  print(f"\n{'policy':<9}{'steps':>7}{'s':>6}{'swapped':>9}{'compiles':>10}{'RSS MiB':>9}{'growth':>8}"
        f"{'slope/10k':>10}{'dev growth':>11}  equal  verdict")
  for r in results:
    if "steps_after_warmup" not in r:
      print(f"{r['policy']:<9} FAILED: {'; '.join(r['failures'])}")
      continue
    dev = "n/a" if r["device_growth_bytes"] is None else f"{r['device_growth_bytes'] / MiB:.2f}"
    slope = "n/a" if r["rss_slope_bytes_per_10k_steps"] is None else f"{r['rss_slope_bytes_per_10k_steps'] / MiB:.2f}"
    print(f"{r['policy']:<9}{r['steps_after_warmup']:>7}{r['seconds']:>6.0f}{r['experts_swapped']:>9}"
          f"{r['compiles_at_warmup']:>5}->{r['compiles_at_end']:<4}{r['rss_at_warmup'] / MiB:>9.1f}"
          f"{r['rss_growth_bytes'] / MiB:>8.2f}{slope:>10}{dev:>11}"
          f"  {'yes' if not any(r['mismatches'].values()) else 'NO':>5}"
          f"  {'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['failures'])}")
    if "full_judged" in r and not r["full_judged"]:
      print(f"{'':<9}against full (recorded, not judged off the CPU): {r['full_requests_equal']} of {r['requests']} "
            f"requests equal, {100 * r['full_token_agreement']:.1f} % of tokens")
  if figure:
    print(f"figure: {figure}")
  return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
