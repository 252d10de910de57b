"""Decode latency and peak device memory of the decoder-only families (OLMoE, Mixtral) under a budget, with
the Hugging Face peers, side by side in one run.

  python benchmarks/bench_causal.py --shape olmoe-1b-7b --dtype bfloat16 --batch 1 --src-len 128 \\
      --new-tokens 64 --repeats 3 --runs full:none swapmoe:33% lfu:33% hf:none accelerate:33% \\
      --max-new-tokens-peer 16 --out benchmarks/causal.jsonl

Each run is a fresh subprocess (so that the runtime's peak-memory counter starts at zero). A shape is a
`DecoderConfig` read by `DecoderConfig.from_hf_dict` from the transformers config of the same sizes
(`OlmoeConfig`, `MixtralConfig`), so that the peers and this project build one model. Weights are
random (speed and memory do not depend on the values) in the checkpoint layout, every expert distinct
(`random_parts`). Runs:
  policy:budget[:staging]  this project: `planner.plan_full` / `plan_uniform` for the request shape
                           (`loader.request_shape`), then `loader.assemble`, as `load` builds a model;
                           budgets as in `load`: "33%" (of the full model), "24GiB", "5/64" (experts);
  hf:none                  `AutoModelForCausalLM` of the same config, random init on the GPU, greedy
                           `generate` forced to `--new-tokens` tokens (`min_new_tokens`);
  accelerate:budget        the same model dispatched by accelerate with `max_memory={0: budget}`: the
                           decoder layers that do not fit stay in CPU memory and are copied to the GPU at
                           every forward. `--max-new-tokens-peer N` caps its tokens (it is slow).
The peers need torch with CUDA (and accelerate); without them they are reported as skipped.

Figures per run (`timing.py`, per request as a user sees it): whole-request latency and ms per token,
time to first token (a decoder-only model's first token comes from the prompt's own device call:
`timing.per_request(first_alone=True)`), decode ms/token from whole device-call boundaries, p50/p95
per call; peak device memory against the budget and the plan's total; the policy's telemetry while
timed (misses, swaps). A table on stdout (ratios against `full`); JSON lines appended to `--out`
(commit, device, versions, config, figures). `--time-builder L` only times building the random
weights of L layers and extrapolates to the whole shape (no device needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# --- shapes ------------------------------------------------------------------------------------------

# name -> (transformers config class, its arguments): the released sizes (the models' config.json).
SHAPES = {
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279)),
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # For CPU checks: OLMoE's semantics (full q/k norm, top-k without renormalisation), grouped kv heads.
    "tiny": ("OlmoeConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=1, eos_token_id=2)),
    "tiny-mixtral": ("MixtralConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}
# The family's decoder layer: what accelerate must not split over devices.
DECODER_LAYER = {"olmoe": "OlmoeDecoderLayer", "mixtral": "MixtralDecoderLayer"}
PEERS = ("hf", "accelerate")
SLOW_PEERS = ("accelerate",)  # `--max-new-tokens-peer` caps their tokens


def hf_config(shape: str):
  """The transformers config of a shape (HF names stay here and in the peer)."""
  import transformers

  cls, kwargs = SHAPES[shape]
  return getattr(transformers, cls)(**kwargs)


def shape_config(shape: str):
  """The `DecoderConfig` of a shape, read from its transformers config's `to_dict()`."""
  from swapmoe_jax.models.decoder.config import DecoderConfig

  return DecoderConfig.from_hf_dict(hf_config(shape).to_dict())


# --- random weights ----------------------------------------------------------------------------------

# Every matrix is a window of one periodic stream of random values (`_Pool`), starting at its own offset:
# a copy per matrix (memcpy speed) instead of a normal draw per value (~50M values/s on one core), so
# the 14 GB of OLMoE-1B-7B or the 87 GiB of Mixtral-8x7B build at memory-copy speed. Two windows of the same
# length are equal only if their offsets are equal modulo the pool length; `_Pool.offset(k)` gives every
# k < _POOL_LEN its own offset, so every expert (and every dense matrix) differs from every other.
_POOL_LEN = (1 << 24) + 43
_STRIDE = 7919  # coprime with _POOL_LEN: k -> k * _STRIDE mod _POOL_LEN is one-to-one
_EXPERT_KEYS = 1 << 20  # expert matrices use keys from here on; dense matrices use the keys below
HF_INIT_STD = 0.02  # transformers' `initializer_range` of both families
_BITS = {2: np.uint16, 4: np.uint32}


class _Pool:
  """`_POOL_LEN` values ~ N(0, std) in the model dtype, copied (as raw bits: numpy copies them without
  the GIL) into windows of any size."""

  def __init__(self, dtype, std: float, seed: int):
    assert math.gcd(_STRIDE, _POOL_LEN) == 1
    values = (np.random.default_rng(seed).standard_normal(_POOL_LEN, np.float32) * std).astype(dtype)
    self.dtype = values.dtype
    self.bits = values.view(_BITS[values.dtype.itemsize])
    self._next_key = 0

  @staticmethod
  def offset(key: int) -> int:
    if not 0 <= key < _POOL_LEN:
      raise ValueError(f"pool key {key} outside [0, {_POOL_LEN})")
    return key * _STRIDE % _POOL_LEN

  def fill(self, out: np.ndarray, key: int) -> np.ndarray:
    """Writes the window of key `key` into `out` (contiguous, the pool's dtype), tiling the pool."""
    flat = out.reshape(-1).view(self.bits.dtype)
    pos, src, n = 0, self.offset(key), flat.size
    while pos < n:
      m = min(n - pos, self.bits.size - src)
      flat[pos:pos + m] = self.bits[src:src + m]
      pos, src = pos + m, 0
    return out

  def matrix(self, *shape) -> np.ndarray:
    """A new dense matrix, of the next dense key."""
    self._next_key += 1
    assert self._next_key < _EXPERT_KEYS
    return self.fill(np.empty(shape, self.dtype), self._next_key)


def random_dense(cfg, pool: _Pool) -> dict:
  """The dense tree of the checkpoint layout (`models/decoder/model.py: params_from_dense`), matrices
  [in, out] ~ N(0, std), norms 1, biases 0."""
  d, c, e = cfg.hidden_size, cfg.head_dim, cfg.num_experts
  hc, gc = cfg.num_heads * c, cfg.num_kv_heads * c
  ones = lambda n: np.ones(n, pool.dtype)  # noqa: E731
  zeros = lambda n: np.zeros(n, pool.dtype)  # noqa: E731
  dense = {"embed": pool.matrix(cfg.vocab_size, d), "final_norm": ones(d)}
  if not cfg.tie_word_embeddings:
    dense["lm_head"] = pool.matrix(d, cfg.vocab_size)
  blocks = {}
  for i in range(cfg.num_layers):
    attn = {"q": pool.matrix(d, hc), "k": pool.matrix(d, gc), "v": pool.matrix(d, gc), "o": pool.matrix(hc, d)}
    if cfg.attention_bias:
      attn |= {"q_b": zeros(hc), "k_b": zeros(gc), "v_b": zeros(gc)}
    if cfg.output_bias:
      attn["o_b"] = zeros(d)
    if cfg.qk_norm == "head":
      attn |= {"q_norm": ones(c), "k_norm": ones(c)}
    elif cfg.qk_norm == "full":
      attn |= {"q_norm": ones(hc), "k_norm": ones(gc)}
    b = {"attn_norm": ones(d), "attn": attn, "ffn_norm": ones(d)}
    if i in cfg.sparse_layers:
      b["router"] = {"w": pool.matrix(d, e)}
      if cfg.shared_d_ff:
        fs = cfg.shared_d_ff
        b["shared"] = {"wi": pool.matrix(d, 2 * fs), "wo": pool.matrix(fs, d), "gate": pool.matrix(d, 1)}
    else:
      b["mlp"] = {"wi": pool.matrix(d, 2 * cfg.dense_d_ff), "wo": pool.matrix(cfg.dense_d_ff, d)}
    blocks[str(i)] = b
  dense["blocks"] = blocks
  return dense


class RandomExperts:
  """Per MoE layer (wi [E, D, 2F], wo [E, F, D]): the checkpoint's [in, out] orientation that
  `HostExpertStore.from_numpy` takes (as `random_model.py` passes Switch experts (wi [E, D, F],
  wo [E, F, D])), each layer built when it is read, so that a store reading them in order holds one
  layer beyond its own copy (Mixtral's 87 GiB fit a 128 GiB host).

  The values are laid out in memory as the store keeps them, [out, in]: each layer is returned as the
  transposed view of [E, 2F, D] / [E, D, F] arrays, which the store's transposition turns back into
  contiguous arrays without a copy. Expert (l, e)'s wi and wo are pool windows of keys of their own;
  the E experts of a layer are filled by `threads` threads.
  """

  def __init__(self, cfg, pool: _Pool, threads: int = 1, progress: bool = False):
    self.cfg, self.pool, self.threads, self.progress = cfg, pool, max(1, threads), progress
    self.layer_bytes = cfg.num_experts * cfg.expert_param_count() * pool.dtype.itemsize

  def __len__(self) -> int:
    return self.cfg.num_moe_layers

  def __getitem__(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= layer < len(self):
      raise IndexError(layer)
    e, d, f = self.cfg.num_experts, self.cfg.hidden_size, self.cfg.moe_d_ff
    wi, wo = np.empty((e, 2 * f, d), self.pool.dtype), np.empty((e, d, f), self.pool.dtype)

    def one(j):
      key = _EXPERT_KEYS + 2 * (layer * e + j)
      self.pool.fill(wi[j], key)
      self.pool.fill(wo[j], key + 1)

    if self.threads == 1:
      for j in range(e):
        one(j)
    else:
      with ThreadPoolExecutor(self.threads) as ex:
        list(ex.map(one, range(e)))
    return np.swapaxes(wi, 1, 2), np.swapaxes(wo, 1, 2)

  def __iter__(self):
    from tqdm.auto import tqdm

    gib = self.layer_bytes / 2**30
    with tqdm(total=len(self), desc=f"random experts ({gib:.2f} GiB/layer)", unit="layer", file=sys.stderr,
              disable=not self.progress, mininterval=1.0) as bar:
      for layer in range(len(self)):
        yield self[layer]
        bar.update(1)


def random_parts(cfg, dtype, seed: int = 0, std: float = HF_INIT_STD, threads: int | None = None,
                 progress: bool = False):
  """(dense tree, per-layer experts (`RandomExperts`, built as read), expert norms float32 [L, E]) of a
  `DecoderConfig` with random weights: what `random_model.random_model_parts` gives for Switch. `dtype`:
  a numpy-compatible dtype or its name ("bfloat16")."""
  import ml_dtypes  # noqa: F401  (numpy bfloat16)

  pool = _Pool(np.dtype(dtype), std, seed)
  dense = random_dense(cfg, pool)
  experts = RandomExperts(cfg, pool, threads or min(8, os.cpu_count() or 1), progress)
  norms = np.random.default_rng(seed + 1).uniform(1.0, 2.0, (cfg.num_moe_layers, cfg.num_experts)).astype(np.float32)
  return dense, experts, norms


def time_builder(cfg, dtype: str, layers: int, threads: int | None) -> dict:
  """Seconds to build the dense tree and `layers` layers of experts, extrapolated to the whole shape."""
  t0 = time.perf_counter()
  import ml_dtypes  # noqa: F401

  pool = _Pool(np.dtype(dtype), HF_INIT_STD, 0)
  t1 = time.perf_counter()
  dense = random_dense(cfg, pool)
  t2 = time.perf_counter()
  experts = RandomExperts(cfg, pool, threads or min(8, os.cpu_count() or 1))
  layers = min(layers, len(experts))
  built = [experts[l] for l in range(layers)]
  t3 = time.perf_counter()
  first = [x[0][0].tobytes() for x in built]  # expert 0 of each layer; and every expert of layer 0:
  distinct = len({w.tobytes() for w in built[0][0]}) == cfg.num_experts and len(set(first)) == len(first)
  dense_bytes = sum(x.nbytes for x in _leaves(dense))
  expert_s = (t3 - t2) / layers
  return {"pool_s": t1 - t0, "dense_s": t2 - t1, "dense_gib": dense_bytes / 2**30, "layers_timed": layers,
          "expert_s_per_layer": expert_s, "expert_gib_per_layer": experts.layer_bytes / 2**30,
          "expert_gib_per_s": experts.layer_bytes / 2**30 / expert_s, "experts_distinct": distinct,
          "threads": experts.threads,
          "whole_shape_s": (t1 - t0) + (t2 - t1) + expert_s * len(experts),
          "whole_shape_gib": (dense_bytes + experts.layer_bytes * len(experts)) / 2**30}


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


# --- this project's runs -----------------------------------------------------------------------------


def random_prompt(rng: np.random.Generator, cfg, batch: int, src_len: int) -> np.ndarray:
  return rng.integers(2, cfg.vocab_size, (batch, src_len)).astype(np.int32)


def _budget_bytes(cfg, budget: str, dbytes: int, shape: dict, staging_slots: int):
  from swapmoe_jax.serving import budget as budget_lib

  if budget in (None, "none"):
    return None
  return budget_lib.parse_budget(budget).resolve_for(cfg, dbytes, **shape, staging_slots=staging_slots)


def build(cfg, dtype: str, policy: str, budget: str, *, batch: int, src_len: int, new_tokens: int,
          update_every: int, max_swaps: int, steps_per_call: int, staging: str, threads: int | None = None,
          progress: bool = True, swap_between_requests: bool | None = None):
  """(model, plan, store, budget bytes, full-model bytes, set-up seconds by phase): the planner for the
  request shape, random weights, `loader.assemble` (as `load` builds a model)."""
  import jax
  import jax.numpy as jnp

  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import loader
  from swapmoe_jax.serving import planner as planner_lib
  from swapmoe_jax.serving.store import HostExpertStore

  if policy not in loader.POLICIES:
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(loader.POLICIES + PEERS)}")
  jdtype = loader.DTYPES[dtype]
  dbytes = jnp.dtype(jdtype).itemsize
  shape = loader.request_shape(cfg, batch, src_len, new_tokens)
  full_bytes = budget_lib.full_model_bytes(cfg, dbytes)
  budget_bytes = _budget_bytes(cfg, budget, dbytes, shape, max_swaps)
  cadence = dict(update_every=update_every, max_swaps_per_step=max_swaps)
  if policy == "full":
    plan = planner_lib.plan_full(cfg, budget_bytes, dbytes, **shape, **cadence)
  else:
    if budget_bytes is None:
      raise ValueError(f"policy {policy!r} needs a budget (e.g. {policy}:33%)")
    plan = planner_lib.plan_uniform(cfg, budget_bytes, dbytes, **shape, **cadence)
  budget_lib.check_fits_device(plan.breakdown.total, jax.devices()[0])  # before building the weights
  t0 = time.perf_counter()
  staging = loader.resolve_staging(staging, cfg, dbytes)
  dense, experts, norms = random_parts(cfg, np.dtype(jdtype), threads=threads, progress=progress)
  store = HostExpertStore.from_numpy(experts, norms, jdtype,  # reads the layers one at a time
                                     pinned=loader.needs_pinned(policy, staging),
                                     banks=loader.needs_banks(policy, staging))
  t1 = time.perf_counter()
  model = loader.assemble(cfg, dense, store, plan, policy=policy, gate_mode="original", dtype=jdtype,
                          limits=shape if budget_bytes is not None else None, steps_per_call=steps_per_call,
                          staging=staging, swap_between_requests=swap_between_requests)
  jax.block_until_ready(model._slots.leaves)
  setup = {"weights_s": t1 - t0, "assemble_s": time.perf_counter() - t1}
  return model, plan, store, budget_bytes, full_bytes, setup


def _timed_generates(model, cfg, rng, args) -> dict:
  """Per-request figures (`timing.py`) of `--repeats` plain and streamed requests."""
  import timing

  chunk, n = args.steps_per_call, args.new_tokens
  plain, streams = [], []
  for _ in range(args.repeats):
    ids = random_prompt(rng, cfg, args.batch, args.src_len)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, steps_per_call=chunk)
    plain.append(time.perf_counter() - t)
    if out.shape[1] != n:
      raise RuntimeError(f"a request stopped after {out.shape[1]} of {n} tokens")
    s = timing.Stamps()
    model.generate(random_prompt(rng, cfg, args.batch, args.src_len), max_new_tokens=n, steps_per_call=chunk,
                   stream=lambda step, tok: s.token())
    streams.append(s)
  return timing.per_request(plain, streams, n, chunk, args.batch, first_alone=True)


_COUNTERS = ("tokens_routed", "redirected", "hits", "misses", "experts_swapped", "bytes_swapped", "from_bank",
             "missed_experts", "bytes_from_host")


def run_ours(args, cfg, common: dict) -> dict:
  import jax

  parts = args.run.split(":")
  policy, budget, staging = parts[0], parts[1] if len(parts) > 1 else "none", parts[2] if len(parts) > 2 else None
  from swapmoe_jax.serving import loader

  staging = staging or loader.DEFAULT_STAGING
  dev = jax.devices()[0]
  mem = lambda key: (dev.memory_stats() or {}).get(key)  # noqa: E731  (None on platforms without stats)
  t0 = time.perf_counter()
  model, plan, store, budget_bytes, full_bytes, setup = build(
      cfg, args.dtype, policy, budget, batch=args.batch, src_len=args.src_len, new_tokens=args.new_tokens,
      update_every=args.update_every, max_swaps=args.max_swaps, steps_per_call=args.steps_per_call,
      staging=staging, threads=args.threads, swap_between_requests=False if args.no_drain else True if args.drain else None)
  peak_after_load, in_use_after_load = mem("peak_bytes_in_use"), mem("bytes_in_use")
  rng = np.random.default_rng(1)
  t1 = time.perf_counter()
  model.generate(random_prompt(rng, cfg, args.batch, args.src_len), max_new_tokens=args.new_tokens)  # compiles
  model.generate(random_prompt(rng, cfg, args.batch, args.src_len), max_new_tokens=args.new_tokens,
                 stream=lambda step, tok: None)
  for _ in range(args.warmup):  # a policy's state after many requests (lfu's counts, swapmoe's scores)
    model.generate(random_prompt(rng, cfg, args.batch, args.src_len), max_new_tokens=args.new_tokens)
  setup["warmup_s"] = time.perf_counter() - t1
  ex = model.residency.executor if model.residency is not None else None
  written = ex.experts_written if ex is not None else 0
  before = model.stats.summary() if model.stats is not None else {}
  timed = _timed_generates(model, cfg, rng, args)
  written = (ex.experts_written if ex is not None else 0) - written
  after = model.stats.summary() if model.stats is not None else {}
  during = {k: after.get(k, 0) - before.get(k, 0) for k in _COUNTERS}
  peak = mem("peak_bytes_in_use")
  decoded = args.repeats * 2 * args.new_tokens  # a plain and a streamed request per repeat
  looked_up = during["hits"] + during["misses"]
  return common | timed | {
      "new_tokens": args.new_tokens, "warmup": args.warmup, "slots_per_layer": list(plan.slots_per_layer),
      "resident_experts": plan.resident_experts, "steps_per_call": args.steps_per_call, "staging": staging,
      "update_every": plan.update_every, "max_swaps": plan.max_swaps_per_step,
      "swap_between_requests": None if model.residency is None else model.residency.swap_between_requests,
      "budget_bytes": budget_bytes, "planned_bytes": plan.breakdown.total, "plan": str(plan.breakdown),
      "full_model_bytes": full_bytes, "peak_device_bytes": peak, "peak_after_load": peak_after_load,
      "in_use_after_load": in_use_after_load,
      "peak_over_budget": peak / budget_bytes if peak and budget_bytes else None,
      "peak_over_plan": peak / plan.breakdown.total if peak else None,
      "setup_s": time.perf_counter() - t0, **setup, "device": dev.device_kind, "platform": dev.platform,
      "devices": 1, "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "expert_bytes": store.expert_bytes,
      # Telemetry over the timed requests (`stats.py`): tokens served by another expert than the one they
      # wanted (masked policies), wanted (layer, expert) pairs per observation window resident or not.
      "timed": during, "misses": during["misses"], "experts_swapped": during["experts_swapped"],
      "redirect_rate": during["redirected"] / during["tokens_routed"] if during["tokens_routed"] else None,
      "hit_rate": during["hits"] / looked_up if looked_up else None, "swaps_per_token": written / decoded,
  }


# --- the Hugging Face peers --------------------------------------------------------------------------


class _Skipped(Exception):
  """A run that cannot be made on this machine (not a failure)."""


def run_peer(args, cfg, common: dict) -> dict:
  """`hf` or `accelerate` (module docstring), in this process."""
  peer, budget = (args.run.split(":") + ["none"])[:2]
  try:
    import torch
  except ImportError:
    raise _Skipped("the peers need torch, which is not installed") from None
  if not torch.cuda.is_available():
    raise _Skipped("the peers are measured on a CUDA GPU; torch sees none")
  import transformers

  import timing
  from peers import _Streamer
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import loader

  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
  dbytes = torch.finfo(tdtype).bits // 8
  full_bytes = budget_lib.full_model_bytes(cfg, dbytes)
  new_tokens = args.new_tokens
  if peer in SLOW_PEERS and args.max_new_tokens_peer:
    new_tokens = min(new_tokens, args.max_new_tokens_peer)
  shape = loader.request_shape(cfg, args.batch, args.src_len, args.new_tokens)
  hf = hf_config(args.shape)
  kwargs = {"experts_implementation": args.hf_experts} if args.hf_experts else {}
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device("cuda"):  # random initialisation on the GPU: seconds instead of minutes on the CPU
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=tdtype, **kwargs)
  model.eval()
  budget_bytes, placement = None, None
  if peer == "accelerate":
    import accelerate

    budget_bytes = _budget_bytes(cfg, budget, dbytes, shape, args.max_swaps)
    model.to("cpu")
    torch.cuda.empty_cache()
    layer = DECODER_LAYER.get(cfg.model_type) or next(iter(model._no_split_modules))
    device_map = accelerate.infer_auto_device_map(model, max_memory={0: budget_bytes, "cpu": 2**40},
                                                  no_split_module_classes=[layer], dtype=tdtype)
    placement = {str(d): sum(1 for v in device_map.values() if v == d) for d in set(device_map.values())}
    model = accelerate.dispatch_model(model, device_map=device_map, main_device=0)
  elif budget not in (None, "none"):
    raise ValueError("the hf peer holds the whole model on the GPU: give hf:none")
  torch.cuda.synchronize()
  setup_s = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  rng = np.random.default_rng(1)

  def gen(n, streamer=None):
    ids = torch.as_tensor(random_prompt(rng, cfg, args.batch, args.src_len), device="cuda")
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=streamer, pad_token_id=cfg.pad_token_id)
    torch.cuda.synchronize()
    if out.shape[1] != args.src_len + n:
      raise RuntimeError(f"generate returned {out.shape[1] - args.src_len} of {n} tokens")

  gen(2)  # warm-up
  plain, streams = [], []
  for _ in range(args.repeats):
    t = time.perf_counter()
    gen(new_tokens)
    plain.append(time.perf_counter() - t)
    stamps = timing.Stamps()
    gen(new_tokens, _Streamer(stamps))  # stamps each token after the prompt's `put`
    streams.append(stamps)
  figures = timing.per_request(plain, streams, new_tokens, 1, args.batch)
  peak = int(torch.cuda.max_memory_allocated())
  try:
    import accelerate as _acc
    acc_version = _acc.__version__
  except ImportError:  # the hf peer runs without it
    acc_version = None
  return common | figures | {
      "new_tokens": new_tokens, "budget_bytes": budget_bytes, "planned_bytes": None, "full_model_bytes": full_bytes,
      "peak_device_bytes": peak, "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
      "peak_over_budget": peak / budget_bytes if budget_bytes else None, "placement": placement,
      "hf_experts_implementation": getattr(model.config, "_experts_implementation", None),
      "setup_s": setup_s, "device": torch.cuda.get_device_name(0), "platform": "cuda", "devices": 1,
      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "versions_peer": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "accelerate": acc_version},
  }


def _versions() -> dict:
  import importlib.metadata as md

  out = {}
  for name in ("jax", "jaxlib", "flax", "numpy", "transformers"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def run_one(args) -> dict:
  """One run of `--run`, in this process."""
  cfg = dataclasses.replace(shape_config(args.shape), eos_token_ids=(-1,))  # never stop early
  policy, budget = (args.run.split(":") + ["none"])[:2]
  common = {"bench": "causal", "shape": args.shape, "family": cfg.model_type, "dtype": args.dtype,
            "policy": policy, "budget": budget, "batch": args.batch, "src_len": args.src_len,
            "config": cfg.to_dict(), "versions": _versions()}
  if policy in PEERS:
    return run_peer(args, cfg, common)
  return run_ours(args, cfg, common)


# --- the driver --------------------------------------------------------------------------------------


def _commit() -> dict:
  if os.environ.get("SWAPMOE_COMMIT"):
    return {"commit": os.environ["SWAPMOE_COMMIT"]}
  git = lambda *a: subprocess.check_output(["git", *a], text=True, stderr=subprocess.DEVNULL, cwd=HERE)  # noqa: E731
  try:
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain", "-uno").strip())}
  except Exception:  # no git, or not a checkout
    return {"commit": None}


def _pump(src, dst, tail: list, limit: int = 8192):
  """Copies a child's stderr to ours as it comes (progress bars), keeping its last `limit` bytes."""
  for chunk in iter(lambda: os.read(src.fileno(), 4096), b""):
    dst.buffer.write(chunk)
    dst.flush()
    tail.append(chunk)
    while sum(map(len, tail)) > limit and len(tail) > 1:
      tail.pop(0)


def _last_line(tail: list) -> str:
  lines = [l.strip() for l in b"".join(tail).decode(errors="replace").replace("\r", "\n").splitlines()]
  lines = [l for l in lines if l]
  return lines[-1][:300] if lines else ""


def run_in_subprocesses(runs, out: str, timeout: float | None) -> list[dict]:
  """Runs each (label, arguments of this script) in a fresh process; appends every result, with the
  commit, to `out` as a JSON line. Returns one row per run: the result, or {"label", "error" or
  "skipped"}."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=os.pathsep.join(
      [os.path.dirname(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  # One persistent compilation cache for the runs: compile time is much of a run's set-up.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(out)), ".jax_cache"))
  commit = _commit()
  rows = []
  for i, (label, run_args) in enumerate(runs):
    print(f"[{i + 1}/{len(runs)}] {label} ...", flush=True)
    t = time.perf_counter()
    tail: list = []
    with tempfile.TemporaryFile() as result:
      proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + run_args, env=env, stdout=result,
                              stderr=subprocess.PIPE)
      pump = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True)
      pump.start()
      try:
        proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail.append(f"\ntimed out after {timeout:.0f} s".encode())
      pump.join(5)
      result.seek(0)
      stdout = result.read()
    lines = [l for l in stdout.decode(errors="replace").splitlines() if l.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {}
    if "skipped" in res or "error" in res:
      row = {"label": label} | res
    elif proc.returncode or not lines:
      row = {"label": label, "error": f"exit code {proc.returncode}: {_last_line(tail)}"}
    else:
      row = res | commit | {"label": label, "wall_s": time.perf_counter() - t}
      with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    what = "skipped: " + row["skipped"] if "skipped" in row else "FAILED: " + row["error"] if "error" in row else "done"
    print(f"  [{i + 1}] {what} ({time.perf_counter() - t:.0f} s)", flush=True)
    rows.append(row)
  return rows


def _g(r, key, scale=1.0, fmt=".2f", width=8):
  v = r.get(key)
  return f"{'-':>{width}}" if v is None else f"{v / scale:>{width}{fmt}}"


def _pct(r, key, width):
  v = r.get(key)
  return f"{'-':>{width}}" if v is None else f"{100 * v:>{width - 1}.0f}%"


def _same_request(a: dict, b: dict) -> bool:
  return all(a.get(k) == b.get(k) for k in ("shape", "dtype", "batch", "src_len"))


def earlier_full_rows(out: str) -> list[dict]:
  """`full` rows of this commit already in `out` (the ratios' reference when this invocation has none:
  runs split over several invocations)."""
  commit = _commit().get("commit")
  if not commit or not os.path.exists(out):
    return []
  rows = []
  for line in open(out):
    try:
      r = json.loads(line)
    except ValueError:
      continue
    if r.get("bench") == "causal" and r.get("policy") == "full" and r.get("commit") == commit:
      rows.append(r)
  return rows


def print_table(rows, earlier: list[dict] = ()) -> None:
  """One line per run; ratios against the `full` run of the same request in `rows` (else the latest in
  `earlier`)."""
  gib = 2**30
  print(f"\n{'shape':<14}{'dt':>5}{'b':>3}{'policy':>11}{'budget':>8}{'plan G':>8}{'peak G':>8}{'pk/bud':>7}"
        f"{'ms/tok':>8}{'vs full':>8}{'dec ms':>8}{'vs full':>8}{'p50':>8}{'p95':>8}{'ttft':>8}{'tok/s':>8}"
        f"{'redir':>7}{'hit':>5}{'sw/tok':>7}{'tok':>5}")
  for r in rows:
    if "ms_per_token" not in r:
      print(f"{r['label']}: {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error']}")
      continue
    fulls = [f for f in list(earlier) + [f for f in rows if "ms_per_token" in f]
             if f.get("policy") == "full" and _same_request(f, r)]
    full = fulls[-1] if fulls else None
    ratio = lambda k: (r[k] / full[k] if full and r.get(k) and full.get(k) else float("nan"))  # noqa: E731
    budget = f"{r['budget_bytes'] / gib:.2f}G" if r.get("budget_bytes") else "-"
    print(f"{r['shape']:<14}{r['dtype'][:4]:>5}{r['batch']:>3}{r['policy']:>11}{budget:>8}"
          f"{_g(r, 'planned_bytes', gib)}{_g(r, 'peak_device_bytes', gib)}{_g(r, 'peak_over_budget', width=7)}"
          f"{_g(r, 'ms_per_token', fmt='.3f')}{ratio('ms_per_token'):>8.2f}{_g(r, 'decode_ms_per_token', fmt='.3f')}"
          f"{ratio('decode_ms_per_token'):>8.2f}{_g(r, 'stream_p50_ms', fmt='.3f')}{_g(r, 'stream_p95_ms', fmt='.3f')}"
          f"{_g(r, 'ttft_ms', fmt='.1f')}{_g(r, 'tokens_per_s', fmt='.1f')}{_pct(r, 'redirect_rate', 7)}"
          f"{_pct(r, 'hit_rate', 5)}"
          f"{_g(r, 'swaps_per_token', width=7)}{r['new_tokens']:>5}")
  print("ms/tok: whole request / tokens; dec ms: per token from whole device-call boundaries; ttft in ms; "
        "pk/bud: peak device memory / budget;\nredir: tokens served by another expert; hit: wanted experts resident; "
        "sw/tok: experts swapped per decoded step (all while timed); tok: tokens per request")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="olmoe-1b-7b", choices=sorted(SHAPES))
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--runs", nargs="+", default=["full:none", "swapmoe:33%", "lfu:33%"],
                 help="policy:budget[:staging] (full:none, swapmoe:33%%, lfu:24GiB, swapmoe:20%%:transfer) or a "
                      "peer (hf:none, accelerate:33%%)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=0,
                 help="plain requests after the two warm-ups, before the timed ones (ours; a policy's steady state)")
  p.add_argument("--update-every", type=int, default=16)
  p.add_argument("--max-swaps", type=int, default=2)
  p.add_argument("--steps-per-call", type=int, default=16, help="decode steps per device call (ours)")
  p.add_argument("--max-new-tokens-peer", type=int, default=0,
                 help="tokens per request of the slow peers (accelerate); 0: --new-tokens")
  p.add_argument("--hf-experts", help="transformers' experts_implementation for the peers (default: its own)")
  p.add_argument("--threads", type=int, help="threads filling the random experts (default: min(8, cores))")
  p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed (0: none)")
  p.add_argument("--time-builder", type=int, metavar="LAYERS",
                 help="only time building the random weights of LAYERS layers and extrapolate to the shape")
  drain = p.add_mutually_exclusive_group()
  drain.add_argument("--no-drain", action="store_true",
                     help="swap_between_requests=False: swaps only during calls, none drained at request ends "
                          "(the library's default for these families)")
  drain.add_argument("--drain", action="store_true", help="swap_between_requests=True: drain at request ends")
  p.add_argument("--out", default=os.path.join(HERE, "causal.jsonl"))
  p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run in this process
  args = p.parse_args(argv)
  if args.time_builder:
    print(json.dumps(time_builder(shape_config(args.shape), args.dtype, args.time_builder, args.threads)))
    return 0
  if args.run:
    try:
      res = run_one(args)
    except _Skipped as e:
      res = {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - reported in the table; the traceback goes to stderr
      import traceback

      traceback.print_exc()
      res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    print("RESULT " + json.dumps(res), flush=True)
    return 1 if "error" in res else 0
  common = ["--shape", args.shape, "--dtype", args.dtype, "--batch", str(args.batch), "--src-len", str(args.src_len),
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--update-every",
            str(args.update_every), "--max-swaps", str(args.max_swaps), "--steps-per-call", str(args.steps_per_call),
            "--max-new-tokens-peer", str(args.max_new_tokens_peer), "--warmup", str(args.warmup)]
  common += ["--hf-experts", args.hf_experts] if args.hf_experts else []
  common += ["--threads", str(args.threads)] if args.threads else []
  common += ["--no-drain"] if args.no_drain else ["--drain"] if args.drain else []
  runs = [(f"{args.shape} {args.dtype} batch {args.batch} {run}", ["--run", run] + common) for run in args.runs]
  earlier = earlier_full_rows(args.out)
  rows = run_in_subprocesses(runs, args.out, args.timeout or None)
  print_table(rows, earlier)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
