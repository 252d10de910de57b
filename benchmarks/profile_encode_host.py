"""The encode's time outside its kernels: what the host spends per call, and whether XLA re-records its CUDA graph.

  python benchmarks/profile_encode_host.py --shape switch-base-64 --budget none --repeats 30 [--out FILE]
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 \\
      python benchmarks/profile_encode_host.py --budget none --repeats 5 --generate 2> LOG
  python benchmarks/profile_encode_host.py --vlog-summary LOG

Builds one random-weight model (`random_model.build`, bf16, batch 1, a 128-token prompt) and times the
encode compiled several ways, each as the median over `--repeats` calls of the host time until the call
returns and the wall time until its outputs are ready:
  lib         `decode.encode` with a numpy prompt, as `generate` calls it;
  dev         the same with the prompt already on the device (the same two arrays every call);
  donate      the previous call's cache donated to this one (`donate_argnums`), so that the outputs
              could reuse its buffers; donate_dev: the same with the prompt on the device;
  enc_only    the encoder's output alone (no decoder cache, no routing statistics);
  h_stats / h_cache / h_cross   the encoder's output with the statistics / the whole decoder cache /
              the cross-attention keys and values only;
  trivial     a program of 300 small inputs and 60 outputs that adds one to each: the runtime's own
              cost per call for arguments and outputs, on the same machine.
`--trace DIR` also traces three calls of four of them (dev, enc_only, h_stats, h_cache) and prints their kernels (`profile_prefill.summarize`).
Phase markers go to stderr, so that a run under XLA's command-buffer logging (the second command) can be
split by phase: `--vlog-summary` counts, per phase, the graph executions, the updates (re-recordings) and
their host time. In the `--generate` phase each device call of a request is marked too (`CALL encode`,
`CALL steps n=16`), and the summary lists the updates that took over 100 us with the call they preceded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def vlog_summary(path: str) -> dict:
  """{phase: {"executes", "updates", "update_us" (sum), "updated_allocs" (first few)}} from a log of
  XLA's command_buffer_thunk at verbosity 3 with this script's phase markers."""
  phase, out, call = None, {}, None
  with open(path, errors="replace") as f:
    for line in f:
      if line.startswith("CALL "):
        call = line[5:].strip()
        continue
      if line.startswith("PHASE_END"):
        phase = None
      elif line.startswith("PHASE "):
        phase = line.split()[1]
        out[phase] = {"executes": 0, "updates": 0, "update_us": 0, "updated_allocs": []}
      elif phase is not None:
        row = out[phase]
        if "Execute command buffer" in line:
          row["executes"] += 1
        if "Update command buffer" in line:  # "Create/Update command buffer ..." in some XLA versions
          row["updates"] += 1
          m = re.search(r"updated_allocs=(\d+)", line)
          if m and len(row["updated_allocs"]) < 8:
            row["updated_allocs"].append(int(m.group(1)))
        m = re.search(r"Updated command buffer in (\d+) \S+; num_commands=(\d+)", line)
        if m:
          row["update_us"] += int(m.group(1))
          if int(m.group(1)) > 100:
            row.setdefault("slow_updates", []).append((call, int(m.group(1)), int(m.group(2))))
  return out


def _mark_calls(decode) -> None:
  """From now on every `decode.encode` / `decode.decode_steps` call writes a line to stderr before it
  starts (`CALL encode`, `CALL steps n=16`), so that a command-buffer log can be read call by call."""
  def marked(fn, label):
    def call(*args, **kw):
      print(f"CALL {label(args)}", file=sys.stderr, flush=True)
      return fn(*args, **kw)
    return call

  decode.encode = marked(decode.encode, lambda args: "encode")
  decode.decode_steps = marked(decode.decode_steps, lambda args: f"steps n={args[13]}")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--shape", default="switch-base-64")
  p.add_argument("--budget", default="none", help="none (`full`) or a `swapmoe` budget such as 33%%")
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--trace", default=None, help="a folder: also trace and summarize four of the variants")
  p.add_argument("--generate", action="store_true", help="then run three 64-token requests (a phase of "
                 "their own, for the command-buffer log)")
  p.add_argument("--out", default=None, help="append the result as one JSON line")
  p.add_argument("--vlog-summary", default=None, help="a log written as above: print its summary and exit")
  a = p.parse_args(argv)
  if a.vlog_summary:
    for phase, row in vlog_summary(a.vlog_summary).items():
      print(f"{phase:<22} {row}")
    return

  import jax
  import jax.numpy as jnp

  import random_model
  from profile_prefill import _dispatch_ms
  from shapes import SHAPES
  from swapmoe_jax.serving import decode

  cfg = dataclasses.replace(SHAPES[a.shape], eos_token_ids=(-1,))
  policy = "full" if a.budget == "none" else "swapmoe"
  built = random_model.build(cfg, "bfloat16", policy, None if a.budget == "none" else a.budget, batch=1,
                             src_len=a.src_len, new_tokens=64, pool=4)
  m = built.model
  ids, mask = random_model.random_prompts(np.random.default_rng(1), cfg, 1, a.src_len)
  d_ids, d_mask = jax.device_put(ids), jax.device_put(mask)
  max_len = decode.cache_length(64)
  encode_fn = decode.encode.__wrapped__

  @functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(7,))
  def encode_into(graphdef, params, slots, input_ids, mask, max_len, banks, old_cache):
    del old_cache  # donated: its buffers may hold this call's outputs
    return encode_fn(graphdef, params, slots, input_ids, mask, max_len, banks)

  @functools.partial(jax.jit, static_argnums=(0, 6))
  def encode_parts(graphdef, params, slots, input_ids, mask, banks, what):
    with decode._numerics(graphdef):
      model = decode._merge(graphdef, params, slots)
      h, stats = model.encode(input_ids, mask, banks)
      outs = [h]
      if "stats" in what:
        outs.append(stats)
      if "cache" in what:
        outs.append(model.init_cache(h, mask, max_len))
      if "cross" in what:
        outs.append(model.cross_kv(h))
      return outs

  def lib():
    return decode.encode(m._graphdef, m._params, m._slots, ids, mask, max_len, m._banks)

  def dev():
    return decode.encode(m._graphdef, m._params, m._slots, d_ids, d_mask, max_len, m._banks)

  held = {"cache": None}

  def donating(prompt_ids, prompt_mask):
    def call():
      if held["cache"] is None:
        held["cache"] = dev()[0]
      held["cache"], stats = encode_into(m._graphdef, m._params, m._slots, prompt_ids, prompt_mask, max_len,
                                         m._banks, held["cache"])
      return held["cache"], stats
    return call

  def part(what):
    return lambda: encode_parts(m._graphdef, m._params, m._slots, d_ids, d_mask, m._banks, what)

  many = [jnp.ones((4,)) for _ in range(300)]
  trivial_fn = jax.jit(lambda xs: tuple(x + 1 for x in xs[:60]))

  variants = [("lib", lib), ("dev", dev), ("donate", donating(ids, mask)), ("donate_dev", donating(d_ids, d_mask)),
              ("enc_only", part(())), ("h_stats", part(("stats",))), ("h_cache", part(("cache",))),
              ("h_cross", part(("cross",))), ("trivial_300in_60out", lambda: trivial_fn(many))]
  ms = {}
  for name, fn in variants:
    jax.block_until_ready(fn())  # compiled before the phase starts
    print(f"PHASE {name}", file=sys.stderr, flush=True)
    ms[name] = _dispatch_ms(fn, a.repeats, release=True)
    print(f"PHASE_END {name}", file=sys.stderr, flush=True)
    print(f"{a.budget:<5} {name:<22} host {ms[name][0]:.3f} ms  wall {ms[name][1]:.3f} ms", flush=True)
  if a.trace:
    from profile_prefill import summarize, trace_to

    for name, fn in variants[1:2] + variants[4:7]:  # dev, enc_only, h_stats, h_cache
      dest = trace_to(os.path.join(a.trace, f"{name}_{a.budget.replace('%', '')}.json.gz"),
                      lambda: [jax.block_until_ready(fn()) for _ in range(3)])
      rows = summarize(dest, top=0) if dest else []
      print(f"trace {a.budget} {name}: kernels {sum(t for _, t, _ in rows) / 3:.3f} ms a call, "
            f"{sum(c for _, _, c in rows) / 3:.0f} kernels")
      for kernel, t, c in rows[:12]:
        print(f"   {t / 3:7.3f} ms {c / 3:5.0f}x {kernel[:110]}")
  if a.generate:
    for _ in range(3):
      m.generate(ids, max_new_tokens=64)
    _mark_calls(decode)
    print("PHASE generate", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for _ in range(3):
      m.generate(ids, max_new_tokens=64)
    print("PHASE_END generate", file=sys.stderr, flush=True)
    print(f"{a.budget} generate, 64 tokens: {(time.perf_counter() - t0) / 3 * 1e3:.2f} ms a request", flush=True)
  row = {"what": "encode_host", "shape": a.shape, "dtype": "bfloat16", "policy": policy, "budget": a.budget,
         "tokens": a.src_len, "device": jax.devices()[0].device_kind,
         "host_wall_ms": {k: [round(h, 4), round(w, 4)] for k, (h, w) in ms.items()},
         "commit": os.environ.get("SWAPMOE_COMMIT"), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  print("RESULT " + json.dumps(row), flush=True)
  if a.out:
    with open(a.out, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
