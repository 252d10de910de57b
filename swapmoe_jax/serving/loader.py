"""`load(folder)`: a converted checkpoint -> a ready `SwitchModel` or `CausalLM` (weights split, experts in
host memory)."""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.models.switch.model import SwitchTransformer
from swapmoe_jax.serving import decode
from swapmoe_jax.serving.engine import (DEFAULT_STEPS_PER_CALL, CausalLM, ServedModel, SwitchModel,
                                       check_steps_per_call, positive_int)
from swapmoe_jax.moe.layer import DEFAULT_SELECTIVE_THRESHOLD, NEVER_THRESHOLD
from swapmoe_jax.serving.store import HostExpertStore

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _norm(w):
  return {"weight": w}


def _torch_major(mats: dict) -> dict:
  """The checkpoint's [in, out] matrices in the model's [out, in] orientation (`layers.linear`)."""
  return {k: np.asarray(v).T for k, v in mats.items()}


def nnx_tree_from_dense(cfg: SwitchConfig, dense: dict) -> dict:
  """Checkpoint dense tree (see `checkpoint.py`) -> the pure dict of `SwitchTransformer`'s params
  (experts excluded: those are slots). Attention and dense FFN matrices are transposed to [out, in]."""
  out = {}
  if cfg.tie_word_embeddings:
    out["shared"] = dense["shared"]
  else:
    out["lm_head"] = dense["lm_head"]
  for stack in ("encoder", "decoder"):
    src = dense[stack]
    blocks = {}
    for key, blk in src["blocks"].items():
      b = {"attn_norm": _norm(blk["attn_norm"]), "attn": _torch_major(blk["attn"]), "ffn_norm": _norm(blk["ffn_norm"])}
      if "cross" in blk:
        b["cross_norm"] = _norm(blk["cross_norm"])
        b["cross"] = _torch_major(blk["cross"])
      if "router" in blk:
        b["moe"] = {"router_w": np.asarray(blk["router"]["w"], np.float32)}
        if "b" in blk["router"]:
          b["moe"]["router_b"] = np.asarray(blk["router"]["b"], np.float32)
      else:
        b["mlp"] = _torch_major(blk["mlp"])
      blocks[int(key)] = b
    out[stack] = {"rel_bias": src["rel_bias"], "final_norm": _norm(src["final_norm"]), "blocks": blocks}
    if not cfg.tie_word_embeddings:
      out[stack]["embed"] = src["embed"] if "embed" in src else dense["shared"]
  return out


def _fill(abstract: dict, values: dict, path=(), put=None) -> dict:
  """Replaces every leaf of the abstract pure dict with the matching value, checking shapes.

  put(path, value, dtype) -> array places each leaf (default: `jnp.asarray` on the default device)."""
  try:
    from swapmoe_jax.checkpoint import CheckpointError
  except ImportError:
    CheckpointError = ValueError
  out = {}
  for k, a in abstract.items():
    p = path + (k,)
    if k not in values:
      raise CheckpointError(f"checkpoint has no tensor for {'/'.join(map(str, p))}")
    v = values[k]
    if isinstance(a, dict):
      out[k] = _fill(a, v, p, put)
    else:
      v = np.asarray(v)
      if tuple(v.shape) != tuple(a.shape):
        raise CheckpointError(f"{'/'.join(map(str, p))}: checkpoint shape {v.shape}, model expects {a.shape}")
      out[k] = jnp.asarray(v, dtype=a.dtype) if put is None else put(p, v, a.dtype)
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(buf, row, k):
  return jax.lax.dynamic_update_slice_in_dim(buf, row.astype(buf.dtype), k, axis=0)


def _fill_slots(store: HostExpertStore, layer: int, experts: np.ndarray, dtype):
  """Slot buffers wi [K, F, D], wo [K, D, F] of one layer, filled one expert at a time into buffers
  allocated at their final size, so loading never holds more than one extra expert on the device."""
  wi_shape, wo_shape = store.expert_shapes
  sharding = jax.sharding.SingleDeviceSharding(store.device)
  wi = jnp.zeros((len(experts),) + wi_shape, dtype, device=sharding)
  wo = jnp.zeros((len(experts),) + wo_shape, dtype, device=sharding)
  for k, e in enumerate(experts):
    a, b = store.gather_to_device(layer, [int(e)])
    wi = _set_row(wi, a, np.int32(k))
    wo = _set_row(wo, b, np.int32(k))
  return wi, wo


def _family(cfg, dense: dict):
  """(module class, the params' pure dict from the dense tree, moe_of(tree, stack, block) -> that MoE
  layer's dict in a pure tree) of the config's model family."""
  if cfg.is_encoder_decoder:
    return SwitchTransformer, nnx_tree_from_dense(cfg, dense), lambda tree, stack, i: tree[stack]["blocks"][i]["moe"]
  from swapmoe_jax.models.decoder.model import CausalMoE, params_from_dense

  return CausalMoE, params_from_dense(cfg, dense), lambda tree, stack, i: tree["blocks"][i]["moe"]


def build_model(cfg: SwitchConfig, dense: dict, store: HostExpertStore, *, dtype=jnp.float32,
                slots_per_layer=None, resident=None, routing="masked", gate_mode="original", mesh=None,
                selective_threshold: float = DEFAULT_SELECTIVE_THRESHOLD, fallback_bits: int = 8,
                selective_encoder: bool = True):
  """Builds (graphdef, params, slots) with the given resident experts per MoE layer.

  resident: per MoE layer, int array [K_l] of the experts placed in slots 0..K_l-1 (default: 0..K_l-1).
  selective_threshold: every MoE layer's threshold under routing "selective" (a parameter: see
    `ServedModel.set_selective_threshold`); with `selective_encoder=False` the encoder's layers get
    `NEVER_THRESHOLD` instead (their misses are redirected).
  Routing "fallback": every MoE layer's int8 (or, with `fallback_bits=4`, packed int4) expert copies are
  quantized from the store's experts on the host (`fallback_copies`) and placed on the device once, with
  the params.
  mesh: None (one device), or a mesh with axis "expert" to split every layer's slots over (then `store`
    is a `sharding.ShardedExpertStore` and every K_l a multiple of the mesh size; see `sharding.py`).
  """
  from swapmoe_jax.serving import sharding

  slots_per_layer = tuple(slots_per_layer or [cfg.num_experts] * cfg.num_moe_layers)
  module, values, moe_of = _family(cfg, dense)
  abstract = nnx.eval_shape(lambda: module(
      cfg, slots_per_layer=slots_per_layer, routing=routing, gate_mode=gate_mode, dtype=dtype))
  if routing == "fallback" and fallback_bits == 4:  # packed int4 copies: half the minor axis
    from swapmoe_jax.moe.layer import VirtualExpertMoE

    for _, layer in nnx.iter_modules(abstract):
      if isinstance(layer, VirtualExpertMoE):
        for var in (layer.wi_q, layer.wo_q):
          shape = var.get_value().shape
          var.set_value(jax.ShapeDtypeStruct(shape[:-1] + (shape[-1] // 2,), jnp.int8))
  if mesh is not None:
    sharding.mark_expert_parallel(abstract, mesh)
  graphdef, params, slots = decode.split_model(abstract)
  pure = nnx.to_pure_dict(params)
  for l, (stack, i) in enumerate(cfg.moe_layers):
    moe_of(values, stack, i)["norms"] = store.norms[l]
    if routing == "selective":
      t = selective_threshold if selective_encoder or stack != "encoder" else NEVER_THRESHOLD
      moe_of(values, stack, i)["selective_threshold"] = np.float32(t)
    if routing == "fallback":
      moe_of(values, stack, i).update(fallback_copies(store, l, fallback_bits))
  nnx.replace_by_pure_dict(params, _fill(pure, values, put=None if mesh is None else sharding.dense_placer(mesh)))
  slot_pure = nnx.to_pure_dict(slots)
  if resident is None:
    resident = [np.arange(k) for k in slots_per_layer]
  for l, (stack, i) in enumerate(cfg.moe_layers):
    experts = np.asarray(resident[l], np.int32)
    slot_of = np.full((cfg.num_experts,), -1, np.int32)
    slot_of[experts] = np.arange(len(experts), dtype=np.int32)
    if mesh is None:
      wi, wo = _fill_slots(store, l, experts, dtype)
      slot_of = jax.device_put(slot_of, store.device)
    else:
      wi, wo = sharding.fill_slots(mesh, store, l, experts, dtype, _fill_slots)
      slot_of = jax.device_put(slot_of, sharding.replicated(mesh))
    moe_of(slot_pure, stack, i).update({"wi": wi, "wo": wo, "slot_of": slot_of})
  nnx.replace_by_pure_dict(slots, slot_pure)
  return graphdef, params, slots


def fallback_copies(store: HostExpertStore, layer: int, bits: int = 8) -> dict:
  """One MoE layer's expert copies for fallback routing, quantized on the host (`moe/quant.py`):
  {"wi_q": int8 [E, F or 2F, D], "wi_scale": float32 [E, F or 2F], "wo_q": int8 [E, D, F], "wo_scale":
  float32 [E, D]} (bits 4: packed pairs, wi_q [E, F or 2F, D / 2], wo_q [E, D, F / 2]), from the store's
  experts in the model dtype (either layout; neither changes)."""
  from swapmoe_jax.moe.quant import quantize

  pairs = [store.expert(layer, e) for e in range(store.num_experts)]
  wi_q, wi_scale = quantize(np.stack([p[0] for p in pairs]), bits)
  wo_q, wo_scale = quantize(np.stack([p[1] for p in pairs]), bits)
  return {"wi_q": wi_q, "wi_scale": wi_scale, "wo_q": wo_q, "wo_scale": wo_scale}


POLICIES = ("full", "swapmoe", "pruned", "lru", "lfu", "selective", "fallback")
PLANNERS = ("auto", "uniform", "calibrated")
STAGINGS = ("auto", "transfer", "gather", "pageable")
DEFAULT_STAGING = "auto"
# "auto" gathers from pinned banks on a GPU while every expert fits in this much pinned host memory
# (XLA's pinned-host allocations stopped a Mixtral-8x7B store of 87 GiB at 64 GB; RESULTS.md).
GATHER_MAX_BYTES = 32 * 2**30


def resolve_staging(staging: str, cfg, dtype_bytes: int, *, platform: str | None = None, mesh=None) -> str:
  """The staging that `staging` means for this model here: "auto" is "gather" on a GPU, one device,
  where all experts take at most `GATHER_MAX_BYTES` (on an H200, switch-base-64 bf16 at 33 %: 1.10x and
  1.12x `full` per request against "pageable"'s 1.21x and 1.38x in two side-by-side runs, and 25k-step
  soaks of +14.2 MiB against +15.9 and +16.0; benchmarks/RESULTS.md, session 31), else "pageable"
  (CPU and TPU: not measured against each other; with `mesh` each device stages from its pinned shard
  whatever the name). Other values are returned as they are."""
  check_staging(staging)
  if staging != "auto":
    return staging
  from swapmoe_jax.serving import budget as budget_lib

  if platform is None:
    platform = jax.devices()[0].platform
  total = budget_lib.expert_bytes_each(cfg, dtype_bytes) * cfg.num_experts * cfg.num_moe_layers
  return "gather" if platform == "gpu" and mesh is None and total <= GATHER_MAX_BYTES else "pageable"


def needs_pinned(policy: str, staging: str) -> bool:
  """Whether a one-device store must hold its experts in pinned host memory: exact and selective routing
  read misses from pinned banks inside the step, and the "transfer" and "gather" stagings copy out of
  pinned memory; the other policies with "pageable" stage from numpy (and "full"/"pruned" only fill
  their slots once)."""
  return reads_bank(policy) or staging != "pageable"


def needs_banks(policy: str, staging: str) -> bool:
  """Whether `assemble` will stack a one-device store's experts into banks (`store.banks()`): exact and
  selective routing read them inside the step, and "gather" staging copies from them. Such a store is
  best built in that layout from the start (`HostExpertStore.from_numpy(banks=True)`)."""
  return reads_bank(policy) or staging == "gather"


def reads_bank(policy: str) -> bool:
  """Whether the policy's routing reads missing experts from the host banks inside the step (exact
  policies; selective, for its misses at or above the threshold): its model gets `store.banks()`."""
  from swapmoe_jax.serving.residency import EXACT_POLICIES, SELECTIVE_POLICIES

  return policy in EXACT_POLICIES + SELECTIVE_POLICIES


def _bank_reads(cfg, dtype_bytes: int, batch: int, policy: str) -> int:
  """Experts a step of `policy` copies from host memory at once, which its plan holds
  (`budget.bank_read_experts`; 0 unless the policy reads the banks inside the step)."""
  from swapmoe_jax.serving import budget as budget_lib

  return budget_lib.bank_read_experts(cfg, dtype_bytes, batch) if reads_bank(policy) else 0


def routing_of(policy: str) -> str:
  """The MoE layers' routing mode (`VirtualExpertMoE`) under a policy."""
  from swapmoe_jax.serving.residency import EXACT_POLICIES, FALLBACK_POLICIES, SELECTIVE_POLICIES

  if policy in FALLBACK_POLICIES:
    return "fallback"
  return "exact" if policy in EXACT_POLICIES else "selective" if policy in SELECTIVE_POLICIES else "masked"



def check_staging(staging: str) -> None:
  if staging not in STAGINGS:
    raise ValueError(f"unknown staging {staging!r}; supported: {', '.join(STAGINGS)}")


def load(folder: str | os.PathLike, *, budget=None, experts: int | None = None, policy: str | None = None,
         planner: str | Sequence[int] = "auto",
         gate_mode: str = "original", dtype: str | None = None, max_batch_size: int = 1,
         max_source_len: int = 512, max_new_tokens: int = 64, update_every: int | None = None,
         max_swaps_per_step: int | None = None, calibration_inputs=None, progress: bool = False,
         devices=None, steps_per_call: int = DEFAULT_STEPS_PER_CALL, staging: str = DEFAULT_STAGING,
         selective_threshold: float | None = None, decay: float | None = None,
         swap_between_requests: bool | None = None, hysteresis: float | None = None,
         prefill_refit: float | None = None, fallback_bits: int | None = None,
         importance_term: str | None = None, prompt_residency: bool | None = None,
         selective_encoder: bool = True):
  """Loads a converted checkpoint (see `python -m checkpoints_conv`) under an optional memory budget.

  Args:
    folder: a folder written by the converter.
    budget: accelerator bytes for the model: "4GiB", "512MiB", "33%" (of the full model), a number
      of bytes, or "5/16": the bytes that hold 5 resident experts in every MoE layer of a model with 16
      (at this request shape and cadence). None: no budget (policy "full").
    experts: K, the same as budget="K/E" (give one of the two): a budget that means the same on
      every model, where a percentage of a small model's weights can be below the runtime reserve.
      Under policy "fallback", K full-precision experts per MoE layer plus the int8 copies of all E
      (more bytes than "swapmoe" at the same K; `experts_budget(..., policy="fallback")` gives them).
    policy: "full" (every expert resident), "swapmoe" (virtual experts, masked gating, importance-driven
      asynchronous swaps), "pruned" (static top-K by expert norm, masked gating), "lru" (exact routing,
      least-recently-used eviction), "lfu" (exact routing, decayed-frequency eviction), "selective"
      (swaps as "swapmoe"; a missing expert whose router probability is >= `selective_threshold` is read
      from the host bank inside the step, as exact routing does, the others are redirected, as masked
      routing does), "fallback" (swaps as "swapmoe"; every expert also has an int8 copy on the device, and
      a token whose expert is not resident is computed with it instead of being redirected: HOBBIT,
      arXiv 2411.01433; the copies are counted in the budget, so it holds fewer full-precision experts;
      with `devices`, each device holds the copies of E / n experts). Default: "full" without a budget, "swapmoe" with one.
    planner: "uniform" (equal K per layer) or "calibrated" (K_l per layer and the first residents by
      routing importance measured on `calibration_inputs`, a list of int token-id arrays, or else
      stored beside the checkpoint by `calibrate_checkpoint`). "auto" (default): "calibrated" where
      `calibration_inputs` are given or the checkpoint has a stored calibration (the built-in model
      does), else "uniform". A stored calibration with allocations searched for `policy`
      (`allocation.search_allocations`) gives K_l from the one whose slot count fits. A sequence of
      ints: K_l per MoE layer as given (`planner.plan_explicit`, e.g. `(6, 6, 4, 4)` beside
      `experts=5` on the built-in model: the same bytes spread otherwise), first residents by the
      stored or given calibration where there is one, else by norm.
    gate_mode: "original" or "renormalized" gate after masked (or selective) routing.
    selective_threshold: policy "selective"'s threshold, a router probability >= 0 (default 0.5,
      `moe.layer.DEFAULT_SELECTIVE_THRESHOLD`: a miss is read from the bank when its expert holds the
      majority of the token's probability, where redirecting it would change the output most). 0
      serves every miss exactly (exact routing's outputs), above 1 none (masked routing's). Change it
      later with `model.set_selective_threshold`, without recompiling.
    dtype: "float32" or "bfloat16" (default: the checkpoint's).
    max_batch_size, max_source_len, max_new_tokens: the largest request the budget must hold (KV caches
      and workspace are accounted for them; larger requests are refused).
    update_every, max_swaps_per_step: swap cadence (defaults: the planner's).
    steps_per_call: decode steps per device call in `generate` (a divisor of 64; swaps land between
      calls, at most `max_swaps_per_step` per call). 1: one call per token.
    staging: how a swap copies an expert to the device (all of a commit's experts in one batched call).
      "auto" (default): "gather" on a GPU where every expert fits in `GATHER_MAX_BYTES` of pinned host
      memory, else "pageable" (`resolve_staging` says why). "pageable": `device_put` from ordinary numpy
      banks (the runtime copies through its own
      pinned buffers, on a transfer stream). "transfer": `device_put` from per-expert pinned host
      arrays, on a transfer stream. "gather": a small jitted program reads them from the layers'
      stacked pinned banks (on the compute stream, so it does not overlap the decode; on an H200 still
      the fastest of the three for `swapmoe`, and host memory levels off). On an H200 with
      jax 0.11.2 every `device_put` out of pinned host memory kept ~2.2 KiB of host memory (RSS) for
      good, the other two ~0 (`benchmarks/rss_staging.py`): "transfer" is not for servers that swap
      for days. Exact policies (lru, lfu) and
      "selective" read misses from pinned banks inside the step, so for them every staging is "gather".
      With `devices`, "pageable" does not apply: each device stages from its pinned host shard.
    decay: the controller's score decay per observation (swapmoe/selective: of Eq. 1 importance, default
      `swap.DEFAULT_DECAY`; lfu: of frequencies, default `swap.DEFAULT_LFU_DECAY`).
    hysteresis: swapmoe/selective/fallback: a resident expert is replaced only by one whose score is above
      (1 + hysteresis) times its own (default `swap.DEFAULT_HYSTERESIS`; see `ImportanceSwapController`).
    importance_term: swapmoe/selective/fallback: what a call adds to an expert's score — "eq1" (default,
      the paper's Eq. 1), "counts" (tokens routed to it) or "routed" (Eq. 1 without the expert's norm);
      see `swap.ImportanceSwapController`.
    fallback_bits: policy "fallback": 8 (default, int8 copies) or 4 (packed int4 copies, half the bytes).
    prefill_refit: encoder-decoder models, swapmoe/selective/fallback: after a request's encoder call, when
      more than this fraction of its encoder tokens were redirected, make each encoder layer's residents
      the experts this request's routing wanted most and run the encoder again (prefill-informed
      residency; `Residency.refit_to_prefill`). None (default): never.
    selective_encoder: policy "selective" on encoder-decoder models: False redirects the encoder's misses
      (masked routing there) and serves only the decoder's from host memory by the threshold. The encoder
      misses most of a layer's experts per request, which on a GPU is nearly all of "selective"'s cost
      (benchmarks/RESULTS.md); on the built-in model at 3 of 16 experts it keeps 96.7 % exact match
      against 91.5 for "swapmoe" (README "Accuracy against budget"). Default True (every layer).
    prompt_residency: swapmoe/selective/fallback: before a request's first device call, move the resident
      sets to the experts that past requests sharing its prompt's tokens wanted (learned online from the
      routing statistics; `residency.PromptPredictor`). No device read and no second call. None
      (default): True for policy "swapmoe" on encoder-decoder models (Switch: on the built-in model +2.7
      points of exact match at 5 of 16 experts, +3.2 at 4, +2.0 at 3, README "Accuracy against budget"),
      False otherwise.
    swap_between_requests: at the end of a request, issue all of the controller's remaining swaps
      instead of leaving them to the next request's calls, a few per call. None (default): True for
      encoder-decoder models (Switch: on the built-in model about a point of exact match without prompt
      residency and nothing with it; on an H200 it keeps the swaps off the next request's calls: on
      random prompts 1.20-1.27x `full` per request against 1.36x without, benchmarks/RESULTS.md), False for
      the decoder-only families, where nothing measured its accuracy and on an H200 it cost 2.56x `full`
      per request on the OLMoE-1B-7B shape at 33 % (2.03 experts swapped per token, random prompts)
      against 1.07x without (README "Supported models").
    progress: show a progress bar while experts are read.
    devices: None (one device, the default), or the devices to split every MoE layer's expert slots
      over: a count (the first n of `jax.devices()`), a list of devices, or a `jax.sharding.Mesh` with
      the single axis "expert" (see `sharding.py`). The budget is then per device (a percentage is of
      the fully resident model's bytes per device), and every K_l a multiple of the device count.
  """
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import planner as planner_lib
  from swapmoe_jax.serving import sharding

  if experts is not None:
    if budget is not None:
      raise ValueError(f"give budget= or experts=, not both (got budget={budget!r}, experts={experts!r})")
    budget = budget_lib.Budget(experts=positive_int("experts", experts))
  policy = policy or ("full" if budget is None else "swapmoe")
  steps_per_call = check_steps_per_call(steps_per_call)
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; supported: {', '.join(POLICIES)}")
  from swapmoe_jax.serving.residency import check_selective_threshold

  selective_threshold = check_selective_threshold(policy, selective_threshold)
  check_staging(staging)
  explicit = None
  if not isinstance(planner, str):
    explicit = check_explicit_slots(planner)
    planner = "auto"
  if planner not in PLANNERS:
    raise ValueError(f"unknown planner {planner!r}; supported: {', '.join(PLANNERS)}, or K per MoE layer "
                     "(a sequence of ints)")
  if policy != "full" and budget is None:
    raise ValueError(f"policy {policy!r} needs a budget (e.g. budget='33%')")
  meta = ckpt.read_metadata(folder)
  dtype_name = dtype or meta.dtype
  if dtype_name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
  jdtype = DTYPES[dtype_name]
  cfg = meta.config
  check_selective_encoder(cfg, policy, selective_encoder)  # before the weights are read
  mesh = None if devices is None else sharding.expert_mesh(devices)
  n = 1 if mesh is None else mesh.size
  fallback = check_fallback_bits(policy, fallback_bits)  # 0, or the copies' bits
  dbytes = jnp.dtype(jdtype).itemsize
  shape = request_shape(cfg, max_batch_size, max_source_len, max_new_tokens)
  cadence = {}
  if update_every is not None:
    cadence["update_every"] = update_every
  if max_swaps_per_step is not None:
    cadence["max_swaps_per_step"] = max_swaps_per_step
  bank_reads = _bank_reads(cfg, dbytes, shape["batch"], policy)
  budget_bytes = None
  in_experts = False  # a budget of K < E experts per layer: K per layer even if every expert would fit
  if budget is not None:
    parsed = budget_lib.parse_budget(budget)
    in_experts = parsed.experts is not None and parsed.experts < cfg.num_experts
    staging_slots = cadence.get("max_swaps_per_step", planner_lib.DEFAULT_MAX_SWAPS_PER_STEP)
    budget_bytes = parsed.resolve_for(cfg, dbytes, **shape, staging_slots=staging_slots, devices=n, fallback=fallback,
                                      bank_reads=bank_reads)
  staging = resolve_staging(staging, cfg, dbytes, mesh=mesh)
  # Before the weights are read: a damaged calibration file fails fast.
  stored, allocations = None, {}
  if planner != "uniform" and policy != "full" and not calibration_inputs:
    stored = ckpt.read_calibration(folder, cfg)
    allocations = ckpt.read_allocations(folder, cfg, policy)
  if planner == "auto":
    planner = "calibrated" if calibration_inputs or stored is not None else "uniform"
  if planner == "calibrated" and policy != "full" and not calibration_inputs and stored is None:
    raise ValueError("planner 'calibrated' needs calibration_inputs (a list of token-id arrays) or a calibration "
                     f"stored with the checkpoint (calibrate_checkpoint); {folder} has none")
  if explicit is not None and policy != "full":  # slots that do not fit fail before the weights are read
    explicit = planner_lib.plan_explicit(cfg, budget_bytes, dbytes, **shape, slots_per_layer=explicit, devices=n,
                                         fallback=fallback, bank_reads=bank_reads, **cadence)
  dense = ckpt.restore_dense(meta)
  experts = ckpt.restore_all_experts(meta, progress=progress)
  if mesh is None:
    store = HostExpertStore.from_numpy(experts, meta.expert_norms, jdtype, pinned=needs_pinned(policy, staging),
                                       banks=needs_banks(policy, staging))
  else:
    store = sharding.ShardedExpertStore.from_numpy(experts, meta.expert_norms, jdtype, mesh)
  del experts
  importance = None  # K_l (unless given) and the first residents follow it
  if policy != "full" and planner == "calibrated":
    importance = stored if stored is not None else calibrate(cfg, dense, store, calibration_inputs, dtype=jdtype,
                                                             mesh=mesh)
  if policy == "full":
    plan = planner_lib.plan_full(cfg, budget_bytes, dbytes, **shape, devices=n, **cadence)
  elif explicit is not None:
    plan = explicit
  elif planner == "uniform":
    plan = planner_lib.plan_uniform(cfg, budget_bytes, dbytes, **shape, devices=n, fallback=fallback,
                                    bank_reads=bank_reads, all_resident_if_fits=not in_experts, **cadence)
  else:
    plan = planner_lib.plan_calibrated(cfg, budget_bytes, dbytes, **shape, importance=importance, devices=n,
                                       fallback=fallback, allocations=allocations, bank_reads=bank_reads,
                                       all_resident_if_fits=not in_experts, **cadence)
  # Per-device plans: every device of a mesh holds the same bytes.
  budget_lib.check_fits_device(plan.breakdown.total, mesh.devices.flat[0] if mesh is not None else store.device)
  return assemble(cfg, dense, store, plan, policy=policy, gate_mode=gate_mode, dtype=jdtype,
                  tokenizer=_tokenizer(meta), meta=meta,
                  limits=shape if budget_bytes is not None else None, importance=importance, mesh=mesh,
                  steps_per_call=steps_per_call, staging=staging, selective_threshold=selective_threshold,
                  decay=decay, swap_between_requests=swap_between_requests, hysteresis=hysteresis,
                  importance_term=importance_term,
                  prefill_refit=prefill_refit, fallback_bits=fallback or 8, prompt_residency=prompt_residency,
                  selective_encoder=selective_encoder)


def check_explicit_slots(slots) -> tuple[int, ...]:
  """`load`'s planner given as K per MoE layer: a non-empty sequence of positive ints."""
  try:
    out = tuple(operator.index(k) for k in slots)
  except TypeError:
    raise ValueError(f"planner must be 'auto', 'uniform', 'calibrated' or K per MoE layer (a sequence of ints), "
                     f"got {slots!r}") from None
  if not out or any(k < 1 for k in out):
    raise ValueError(f"planner as K per MoE layer needs positive ints, got {list(out)}")
  return out


def experts_budget(folder: str | os.PathLike, experts_per_layer: int, *, dtype: str | None = None,
                   max_batch_size: int = 1, max_source_len: int = 512, max_new_tokens: int = 64,
                   max_swaps_per_step: int | None = None, devices: int | None = None,
                   policy: str | None = None, fallback_bits: int | None = None) -> int:
  """The budget in bytes that `load` (uniform planner, same dtype and request shape) turns into exactly
  `experts_per_layer` resident experts per MoE layer; K = E is the full model. Under `policy` "fallback"
  the bytes also hold the int8 copies of every expert (the budget of `load(..., policy="fallback",
  experts=K)`), and under "lru", "lfu" and "selective" the experts they copy from host memory inside a
  step (`budget.bank_read_experts`); every other policy's K experts cost the same.

  For sweeps over K, which mean the same on every model, where a percentage of a tiny model's weights
  is below the runtime reserve (`load(..., experts=K)` does the same in one step). `devices`: a count,
  as `load` takes it; the bytes are then per device. Reads only the checkpoint's metadata.
  """
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving.planner import DEFAULT_MAX_SWAPS_PER_STEP

  meta = ckpt.read_metadata(folder)
  dtype_name = dtype or meta.dtype
  if dtype_name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
  staging = DEFAULT_MAX_SWAPS_PER_STEP if max_swaps_per_step is None else max_swaps_per_step
  shape = request_shape(meta.config, max_batch_size, max_source_len, max_new_tokens)
  if policy is not None and policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; supported: {', '.join(POLICIES)}")
  dbytes = jnp.dtype(DTYPES[dtype_name]).itemsize
  reads = _bank_reads(meta.config, dbytes, shape["batch"], policy) if policy else 0
  return budget_lib.budget_for_experts(meta.config, dbytes, experts_per_layer,
                                       shape["batch"], shape["src_len"], shape["tgt_len"], staging,
                                       1 if devices is None else devices,
                                       fallback=0 if policy is None else check_fallback_bits(policy, fallback_bits),
                                       bank_reads=reads)


def check_fallback_bits(policy: str, bits) -> int:
  """`load(fallback_bits=)` -> the copies' bits under policy "fallback" (default 8), 0 for other policies
  (which refuse a value)."""
  if routing_of(policy) != "fallback":
    if bits is not None:
      raise ValueError(f"fallback_bits applies to policy 'fallback', not {policy!r}")
    return 0
  if bits is None:
    return 8
  if isinstance(bits, (bool, np.bool_)) or bits not in (4, 8):
    raise ValueError(f"fallback_bits must be 4 or 8, got {bits!r}")
  return int(bits)


def request_shape(cfg, max_batch_size: int, max_source_len: int, max_new_tokens: int) -> dict:
  """The largest request a plan holds: {"batch", "src_len", "tgt_len"} in device positions (a decoder-only
  model's prompt rounded up as `generate` pads it, `decode.prompt_length`; the generated positions as
  the cache holds them, `decode.cache_length`)."""
  src_len = positive_int("max_source_len", max_source_len)
  return dict(batch=positive_int("max_batch_size", max_batch_size),
              src_len=src_len if cfg.is_encoder_decoder else decode.prompt_length(src_len),
              tgt_len=decode.cache_length(positive_int("max_new_tokens", max_new_tokens)))


def initial_resident(policy: str, store: HostExpertStore, slots_per_layer, importance=None):
  """Experts placed in the slots at start: all for "full"; else the top-K_l by calibration importance
  float[L, E] when given (ties, e.g. experts calibration never routed to, by expert norm), by expert
  norm otherwise (the paper's Pruning choice)."""
  from swapmoe_jax.serving.swap import pruned_resident

  if policy == "full":
    return [np.arange(k) for k in slots_per_layer]
  if importance is None:
    return pruned_resident(store.norms, slots_per_layer)
  importance = np.asarray(importance, np.float64)
  norms = np.asarray(store.norms, np.float64)
  if importance.shape != norms.shape:
    raise ValueError(f"importance must be [L, E] = {norms.shape}, got {importance.shape}")
  return [np.lexsort((-n, -imp))[:k].astype(np.int32) for imp, n, k in zip(importance, norms, slots_per_layer)]


def assemble(cfg: SwitchConfig, dense: dict, store: HostExpertStore, plan, *, policy: str, gate_mode: str,
             dtype, tokenizer=None, meta=None, limits=None, importance=None, mesh=None,
             steps_per_call: int = DEFAULT_STEPS_PER_CALL, staging: str = DEFAULT_STAGING,
             selective_threshold: float = DEFAULT_SELECTIVE_THRESHOLD, decay: float | None = None,
             swap_between_requests: bool | None = None, hysteresis: float | None = None,
             prefill_refit: float | None = None, fallback_bits: int = 8,
             importance_term: str | None = None, prompt_residency: bool | None = None,
             selective_encoder: bool = True) -> ServedModel:
  """Builds the serving model for a plan and a policy (controller, executor, telemetry); `mesh`: see
  `build_model`; `staging`, `selective_threshold`, `decay`, `swap_between_requests`, `hysteresis`,
  `prefill_refit`, `fallback_bits`, `importance_term`, `prompt_residency`, `selective_encoder`: see
  `load`."""
  from swapmoe_jax.serving import sharding
  from swapmoe_jax.serving.executor import SwapExecutor
  from swapmoe_jax.serving.residency import Residency
  from swapmoe_jax.serving.stats import Telemetry
  from swapmoe_jax.serving.swap import make_controller

  selective_encoder = check_selective_encoder(cfg, policy, selective_encoder)
  slots = plan.slots_per_layer
  resident = initial_resident(policy, store, slots, importance)
  bank = reads_bank(policy)
  graphdef, params, slot_state = build_model(cfg, dense, store, dtype=dtype, slots_per_layer=slots,
                                             resident=resident, routing=routing_of(policy),
                                             gate_mode=gate_mode, mesh=mesh, selective_threshold=selective_threshold,
                                             fallback_bits=fallback_bits, selective_encoder=selective_encoder)
  # The controller observes once per window of `plan.update_every` calls (Residency sums statistics on
  # the device), so it recomputes its targets at every observation.
  controller = make_controller(policy, cfg.num_experts, slots, resident, update_every=1,
                               max_swaps_per_step=plan.max_swaps_per_step, decay=decay, hysteresis=hysteresis,
                               importance_term=importance_term,
                               expert_norms=store.norms if importance_term == "routed" else None)
  # Exact and selective routing read misses from stacked host banks, and staging="gather" stages from
  # them; building them changes how the store stages experts, so it comes before the executor compiles
  # its programs.
  staging = resolve_staging(staging, cfg, np.dtype(dtype).itemsize, mesh=mesh,
                            platform=None if mesh is not None else store.device.platform)
  swaps = policy in ("swapmoe", "selective", "fallback", "lru", "lfu") and plan.max_swaps_per_step > 0
  if needs_banks(policy, staging):
    store.banks()
  elif staging == "pageable" and mesh is None and swaps:  # nothing to stage otherwise
    store.to_pageable()
  executor = None
  if swaps:
    if mesh is None:
      executor = SwapExecutor(store, cfg.moe_layers, slots, plan.max_swaps_per_step)
    else:
      executor = sharding.ShardedSwapExecutor(store, cfg.moe_layers, slots, plan.max_swaps_per_step, mesh)
    maps = [controller.state.index_map(l) for l in range(cfg.num_moe_layers)]
    slot_state = executor.warm_up(slot_state, resident, maps).tree()
  if prefill_refit is not None and not cfg.is_encoder_decoder:
    raise ValueError("prefill_refit applies to encoder-decoder models (Switch) only")
  telemetry = Telemetry(policy, host_expert_bytes=store.expert_bytes if bank else 0)
  if prompt_residency is None:
    prompt_residency = cfg.is_encoder_decoder and policy == "swapmoe"  # see `load`
  if swap_between_requests is None:
    swap_between_requests = cfg.is_encoder_decoder  # see `load`
  residency = Residency(cfg, controller, executor, telemetry, update_every=plan.update_every,
                        swap_between_requests=swap_between_requests, prefill_refit=prefill_refit,
                        prompt_residency=prompt_residency)
  served = SwitchModel if cfg.is_encoder_decoder else CausalLM
  return served(cfg, graphdef, params, slot_state, dtype=dtype, store=store, tokenizer=tokenizer,
                policy=policy, banks=store.banks() if bank else None, meta=meta,
                residency=residency, plan=plan, limits=limits, steps_per_call=steps_per_call,
                selective_encoder=selective_encoder)


def check_selective_encoder(cfg, policy: str, value) -> bool:
  """`load(selective_encoder=)`: a bool; False only for policy "selective" on an encoder-decoder model."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"selective_encoder must be True or False, got {value!r:.40}")
  if not value and policy != "selective":
    raise ValueError(f"selective_encoder=False applies to policy 'selective' only, not {policy!r}")
  if not value and not cfg.is_encoder_decoder:
    raise ValueError("selective_encoder=False applies to encoder-decoder models (Switch) only: a decoder-only "
                     "model's prompt and decode steps run the same layers")
  return bool(value)


def calibrate_checkpoint(folder: str | os.PathLike, inputs, *, dtype: str | None = None, note: str = "") -> str:
  """Measures the routing importance of every expert (Eq. 1) over calibration prompts `inputs` (int
  token-id arrays, from the workload the model will serve) and stores it beside the checkpoint
  (`checkpoint.CALIBRATION_FILE`), where `load`'s default planner finds it: K_l per layer and the
  first residents follow it at any budget. Returns the file's path."""
  from swapmoe_jax import checkpoint as ckpt

  if not inputs:
    raise ValueError("calibrate_checkpoint needs at least one prompt (a list of token-id arrays)")
  meta = ckpt.read_metadata(folder)
  jdtype = DTYPES[dtype or meta.dtype]
  store = HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, jdtype, pinned=True,
                                     banks=True)
  importance = calibrate(meta.config, ckpt.restore_dense(meta), store, inputs, dtype=jdtype)
  return ckpt.write_calibration(folder, importance, prompts=len(inputs), note=note)


def calibrate(cfg: SwitchConfig, dense: dict, store: HostExpertStore, inputs, *, dtype, new_tokens: int = 16,
              mesh=None):
  """Importance float64[L, E] of every expert (Eq. 1, unmasked router) over calibration prompts, measured
  with exact routing and one resident expert per layer (per device with a mesh), so calibration itself
  fits any valid budget."""
  plan = _OneSlotPlan(cfg.num_moe_layers, 1 if mesh is None else mesh.size)
  model = assemble(cfg, dense, store, plan, policy="lru", gate_mode="original", dtype=dtype, mesh=mesh)
  for ids in inputs:
    model.generate(np.asarray(ids), max_new_tokens=new_tokens)
  return model.residency.totals.importance


class _OneSlotPlan:
  def __init__(self, num_layers, devices=1):
    self.slots_per_layer = (devices,) * num_layers
    self.update_every = 1 << 30
    self.max_swaps_per_step = 0


def _tokenizer(meta):
  if not meta.tokenizer_dir:
    return None
  try:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(meta.tokenizer_dir)
  except Exception as e:  # a checkpoint without a usable tokenizer still serves ids
    import warnings
    warnings.warn(f"could not load the tokenizer in {meta.tokenizer_dir}: {e}")
    return None
