"""Memory budgets: parse what the user typed, and count the bytes a plan will occupy.

The budget bounds *everything this package puts on the accelerator*: dense weights, the resident expert
slots, the KV caches, the staging buffers that incoming experts land in, an estimate of the
activation workspace, under policy "fallback" the int8 copies of every expert (`fallback_bytes`), and
under exact and selective routing the experts a step copies from host memory at once
(`bank_read_experts`). The paper overshot its limits (3.58 GiB used for a 3.5 GiB limit, SWAPMOE.md §2);
here a plan whose `MemoryBreakdown.total` exceeds the budget is never produced.

Axis letters: L MoE layers, E experts, K slots, B batch, S source length, T target length, D d_model,
F d_ff, H heads, C head dim, V vocab, NB relative-position buckets.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from swapmoe_jax.models.switch.config import SwitchConfig

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

# Binary units; single letters follow docker/JVM ("4G" is 4 GiB). "B"-suffixed SI units are decimal.
_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_BUDGET_RE = re.compile(
    r"^\s*(?P<num>[+-]?(?:nan|inf(?:inity)?|[\d_]*\.?[\d_]*(?:e[+-]?\d+)?))\s*(?P<unit>[a-z%]*)\s*$",
    re.IGNORECASE)
_EXAMPLES = ("'4GiB', '4.5 GiB', '512MiB', '3GB', '1e9' (bytes), '33%' (of the full model) or '5/16' (resident "
             "experts per MoE layer, of 16)")
_EXPERTS_RE = re.compile(r"^\s*(?P<k>\d+)\s*/\s*(?P<e>\d+)\s*$")

# Activations are estimated in float32 whatever the weight dtype (softmax and router run in float32,
# HF semantics), times this margin for XLA temporaries the count does not name.
WORKSPACE_DTYPE_BYTES = 4
WORKSPACE_MARGIN = 1.25
# Device memory the runtime takes besides our arrays (cuBLAS workspaces, small constants of the compiled
# programs): a fixed reserve in every plan. XLA's GEMM autotuner is switched off (see __init__.py): on
# an H200 it took ~0.5 GiB of scratch while compiling switch-base-64 programs.
RUNTIME_RESERVE_BYTES = 64 * 2**20
# What the device allocator adds over the arrays it holds (rounding, chunks handed out whole), as a
# fraction of a plan's array bytes. Measured on an H200 under XLA's default BFC allocator, peaks exceeded
# the arrays' plan by up to 4.4 % (Mixtral-8x7B shape at 24 GiB: 24.78 GiB against 23.74 planned;
# switch-base-64 at 50 %: 3.68 GiB against a 3.53 GiB budget); benchmarks/RESULTS.md has the rows.
ALLOCATOR_MARGIN_PERCENT = 6
# ... plus this many experts' bytes: the allocator's unusable remainder grows with the size of the chunks
# it hands out, and an expert is the largest array a plan moves (a staged swap, a slot written). The
# percentage alone did not hold for Mixtral's 336 MiB experts: at 24 GiB, over two requests of 64 tokens
# with swaps, the peak reached 24.02 GiB against 22.42 GiB of arrays, 7.1 % over them (one H200 run of
# `benchmarks/bench_causal.py --shape mixtral-8x7b --runs swapmoe:24GiB --new-tokens 64 --repeats 2`).
ALLOCATOR_MARGIN_EXPERTS = 2


class BudgetError(ValueError):
  """A budget that is malformed, or too small for the model."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """A memory limit: absolute bytes, a percentage of the full model's weight bytes, or a number of
  resident experts per MoE layer (`experts` of `num_experts`, "5/16": the bytes whose uniform plan holds
  exactly that many, which means the same on every model, however small; see `resolve_for`)."""

  absolute_bytes: int | None = None
  percent: float | None = None
  experts: int | None = None
  num_experts: int | None = None  # the E of "K/E", checked against the model's

  def __post_init__(self):
    if sum(x is not None for x in (self.absolute_bytes, self.percent, self.experts)) != 1:
      raise BudgetError("a Budget holds exactly one of absolute_bytes, percent and experts")
    if self.experts is not None and (self.experts < 1 or (self.num_experts is not None
                                                          and not self.experts <= self.num_experts)):
      raise BudgetError(f"resident experts must be in [1, {self.num_experts or 'E'}], got {self.experts}")
    if self.absolute_bytes is not None and self.absolute_bytes <= 0:
      raise BudgetError(f"budget must be positive, got {self.absolute_bytes} bytes")
    if self.percent is not None and not 0 < self.percent <= 100:
      raise BudgetError(f"budget percentage must be in (0, 100], got {self.percent}%")

  def resolve(self, full_model_bytes: int) -> int:
    """Bytes this budget allows for a model whose weights (dense + all experts) take `full_model_bytes`.
    A budget in experts needs the model and the request shape: `resolve_for`."""
    if self.experts is not None:
      raise BudgetError(f"budget {self} counts experts; resolve it with resolve_for(config, ...)")
    if self.absolute_bytes is not None:
      return self.absolute_bytes
    # Decimal so that "50%" of an odd byte count floors exactly; a budget is a ceiling.
    return int(decimal.Decimal(int(full_model_bytes)) * decimal.Decimal(repr(self.percent)) / 100)

  def resolve_for(self, config: SwitchConfig, dtype_bytes, *, batch: int, src_len: int, tgt_len: int,
                  staging_slots: int, devices: int = 1, fallback: bool = False, bank_reads: int = 0) -> int:
    """Bytes this budget allows for `config` at this request shape (per device with `devices`). With
    `fallback` (policy "fallback"), a budget in experts holds K full-precision experts per MoE layer plus
    the int8 copies of all of them (`fallback_bytes`); with `bank_reads`, plus the experts that exact and
    selective routing copy from host memory inside a step (`bank_read_experts`)."""
    if self.experts is None:
      return self.resolve(full_model_bytes(config, dtype_bytes, devices))
    if self.num_experts is not None and self.num_experts != config.num_experts:
      raise BudgetError(f"budget {self} counts experts of {self.num_experts}, but this model has "
                        f"{config.num_experts} experts per MoE layer; write e.g. "
                        f"'{min(self.experts, config.num_experts)}/{config.num_experts}'")
    if not self.experts <= config.num_experts:
      raise BudgetError(f"budget of {self.experts} resident experts per MoE layer, but this model has "
                        f"{config.num_experts}")
    if self.experts % devices:
      raise BudgetError(f"{self.experts} resident experts per MoE layer do not split over {devices} devices; "
                        f"give a multiple of {devices}")
    return budget_for_experts(config, dtype_bytes, self.experts, batch, src_len, tgt_len, staging_slots, devices,
                              fallback=fallback, bank_reads=bank_reads)

  def __str__(self) -> str:
    if self.experts is not None:
      return f"{self.experts}/{self.num_experts}" if self.num_experts is not None else f"{self.experts} experts"
    if self.percent is not None:
      p = self.percent
      return f"{int(p)}%" if float(p).is_integer() else f"{p!r}%"
    n = self.absolute_bytes
    for name, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
      if n % unit == 0:
        return f"{n // unit}{name}"
    return str(n)


def parse_budget(value: str | int | float | Budget) -> Budget:
  """Parses '4GiB', '4.5 GiB', '512MiB', '3GB' (decimal), '1e9' or 4_000_000_000 (bytes), '33%', '5/16'
  (5 resident experts per MoE layer of a model with 16).

  Units are case-insensitive. Fractional byte counts are floored (a budget is a ceiling).

  Raises:
    BudgetError: malformed text, an unknown unit, a negative, zero, NaN or infinite amount, a
      percentage above 100, or an amount below one byte.
  """
  if isinstance(value, Budget):
    return value
  if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
    raise BudgetError(f"budget must be text or a number of bytes, got {type(value).__name__}: {value!r}")
  text = str(value) if isinstance(value, str) else repr(value.item() if hasattr(value, "item") else value)
  m = _EXPERTS_RE.match(text)
  if m:
    k, e = int(m.group("k")), int(m.group("e"))
    if not 1 <= k <= e:
      raise BudgetError(f"budget {text!r}: resident experts must be in [1, {e}]")
    return Budget(experts=k, num_experts=e)
  m = _BUDGET_RE.match(text)
  if not m:
    raise BudgetError(f"malformed budget {text!r}; expected e.g. {_EXAMPLES}")
  number, unit = m.group("num"), m.group("unit").lower()
  try:
    amount = decimal.Decimal(number)
  except decimal.InvalidOperation:
    raise BudgetError(f"malformed budget {text!r}: {number!r} is not a number; expected e.g. {_EXAMPLES}"
                      ) from None
  if amount.is_nan():
    raise BudgetError(f"budget {text!r} is not a number (NaN)")
  if amount.is_infinite():
    raise BudgetError(f"budget {text!r} is infinite; give a finite amount, e.g. {_EXAMPLES}")
  if amount < 0:
    raise BudgetError(f"budget {text!r} is negative; it must be positive")
  if amount == 0:
    raise BudgetError(f"budget {text!r} is zero; it must be positive")
  if unit == "%":
    if amount > 100:
      raise BudgetError(f"budget {text!r} is above 100% of the model; use at most '100%'")
    return Budget(percent=float(amount))
  if unit not in _UNITS:
    raise BudgetError(f"unknown unit {m.group('unit')!r} in budget {text!r}; "
                      "use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %")
  if amount.adjusted() > 30:  # also keeps int() below cheap for inputs like '1e999999999'
    raise BudgetError(f"budget {text!r} is implausibly large")
  n = int(amount * _UNITS[unit])  # floors: amount > 0
  if n < 1:
    hint = " (for a fraction of the model write e.g. '33%')" if unit == "" else ""
    raise BudgetError(f"budget {text!r} is less than one byte{hint}")
  return Budget(absolute_bytes=n)


def format_bytes(n: int | float) -> str:
  """'512 B', '1.50 KiB', '4.38 GiB': binary units, two decimals."""
  sign, n = ("-" if n < 0 else ""), abs(n)
  for name, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
    if n >= unit:
      return f"{sign}{n / unit:.2f} {name}"
  return f"{sign}{int(n)} B"


def dtype_size(dtype: int | str | np.dtype) -> int:
  """Bytes per element: an int passes through; 'bfloat16', 'float32', np.float16, ... via numpy."""
  if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
    if dtype <= 0:
      raise ValueError(f"dtype_bytes must be positive, got {dtype}")
    return int(dtype)
  import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy)

  return np.dtype(dtype).itemsize


# --- parameter counts -------------------------------------------------------------------------------


def dense_param_count(config: SwitchConfig) -> int:
  """Parameters that are always resident: everything but the experts.

  Counts the model's dense parameters: shared [V,D] when embeddings are tied; otherwise each stack's
  own input embedding [V,D] (transformers 5 unties them with the LM head) and lm_head [D,V]; per stack rel_bias [NB,H]
  (block 0 only, reused by all blocks) and final_norm [D]; per block attn_norm [D], q/k/v [D,H*C],
  o [H*C,D], ffn_norm [D], then either a dense mlp wi [D,F] + wo [F,D] or a router w [D,E] (+ b [E]);
  decoder blocks also cross_norm [D] and cross q/k/v/o.
  A decoder-only family counts its own (`config.dense_param_count()`).
  """
  if not config.is_encoder_decoder:
    return config.dense_param_count()
  c = config
  d, hc, e = c.d_model, c.inner_dim, c.num_experts
  attention = 4 * d * hc
  dense_ffn = 2 * d * c.d_ff
  router = d * e + (e if c.router_bias else 0)
  total = c.vocab_size * d if c.tie_word_embeddings else 3 * c.vocab_size * d
  for num_blocks, sparse, cross in ((c.num_layers, c.encoder_sparse_layers, False),
                                    (c.num_decoder_layers, c.decoder_sparse_layers, True)):
    total += c.relative_attention_num_buckets * c.num_heads + d  # rel_bias, final_norm
    for i in range(num_blocks):
      total += 2 * d + attention  # attn_norm, ffn_norm, self-attention
      total += router if i in sparse else dense_ffn
      if cross:
        total += d + attention  # cross_norm, cross-attention
  return total


def router_param_count(config: SwitchConfig) -> int:
  """Router parameters (w [D,E], b [E]) of all MoE layers: held in float32 whatever the model dtype."""
  if not config.is_encoder_decoder:
    return config.router_param_count()
  e = config.num_experts
  return config.num_moe_layers * (config.d_model * e + (e if config.router_bias else 0))


def dense_bytes(config: SwitchConfig, dtype_bytes: int | str | np.dtype) -> int:
  """Device bytes of the dense parameters: routers in float32 (HF routes in float32), plus each MoE
  layer's expert norms [E] and index map [E] (4 bytes each); the rest in the model dtype."""
  routers = router_param_count(config)
  per_layer = 2 * 4 * config.num_experts
  return ((dense_param_count(config) - routers) * dtype_size(dtype_bytes) + routers * 4
          + config.num_moe_layers * per_layer)


def expert_bytes_each(config: SwitchConfig, dtype_bytes: int | str | np.dtype) -> int:
  """Bytes of one expert (wi [D,F] + wo [F,D]; a gated expert's wi is [D,2F]) in the model dtype."""
  return config.expert_param_count() * dtype_size(dtype_bytes)


def bank_read_experts(config: SwitchConfig, dtype_bytes: int | str | np.dtype, batch: int) -> int:
  """Experts that exact or selective routing (policies lru, lfu, selective) hold on the device at once
  while reading missing experts from host memory inside a step: a decode step of B sequences has B·k
  rows (k experts per token), and copies one expert per row while `reads_misses_by_row` says so; the
  prefill, and a decode step of more rows or bigger experts, copies one expert at a time."""
  from swapmoe_jax.moe.experts import reads_misses_by_row

  rows = batch * getattr(config, "top_k", 1)
  return rows if reads_misses_by_row(rows, expert_bytes_each(config, dtype_bytes), decode=True) else 1


def fallback_bits(fallback) -> int:
  """The `fallback` argument of the functions below -> bits of the copies: False/None/0 -> 0 (none),
  True -> 8, 8 or 4 -> themselves (policy "fallback", `load(fallback_bits=)`)."""
  if fallback is None or fallback is False or fallback == 0:
    return 0
  if fallback is True:
    return 8
  if fallback in (4, 8) and not isinstance(fallback, bool):
    return int(fallback)
  raise ValueError(f"fallback must be False, True, 4 or 8 (bits of the copies), got {fallback!r}")


def fallback_bytes(config: SwitchConfig, bits: int = 8) -> int:
  """Device bytes of fallback routing's copies (`moe/quant.py`): every expert of every MoE layer as int8
  (or packed int4) weights plus one float32 scale per output row (wi's F rows, 2F for a gated expert,
  and wo's D): L × E × (expert parameters × bits / 8 + scales × 4)."""
  if bits not in (4, 8):
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")
  d = config.d_model
  rows = config.d_ff if config.is_encoder_decoder else 2 * config.moe_d_ff  # wi's output rows
  per_expert = config.expert_param_count() * bits // 8 + 4 * (rows + d)
  return config.num_moe_layers * config.num_experts * per_expert


def full_model_bytes(config: SwitchConfig, dtype_bytes: int | str | np.dtype, devices: int = 1) -> int:
  """Weight bytes of the whole model: dense + every expert of every MoE layer (per device when the
  experts are split over `devices` and the dense weights replicated)."""
  experts = config.num_moe_layers * config.num_experts * config.expert_param_count()
  return dense_bytes(config, dtype_bytes) + experts * dtype_size(dtype_bytes) // devices


# --- the memory a plan occupies ---------------------------------------------------------------------


def allocator_margin(arrays: int, one_expert_bytes: int) -> int:
  """What the device allocator adds over `arrays` bytes of a plan's arrays (see ALLOCATOR_MARGIN_*)."""
  return -(-arrays * ALLOCATOR_MARGIN_PERCENT // 100) + ALLOCATOR_MARGIN_EXPERTS * one_expert_bytes  # rounded up


def arrays_within(budget_bytes: int, one_expert_bytes: int) -> int:
  """The most array bytes A whose plan fits `budget_bytes`: A + allocator_margin(A) <= budget."""
  return max(0, budget_bytes - ALLOCATOR_MARGIN_EXPERTS * one_expert_bytes) * 100 // (100 + ALLOCATOR_MARGIN_PERCENT)


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
  """Accelerator bytes of one plan, by kind. `fallback_bytes`: the int8 expert copies of policy "fallback"
  (0 otherwise). `bank_read_bytes`: the experts that exact and selective routing copy from host memory
  inside a step, at once (0 for the other policies). `allocator_bytes` is `ALLOCATOR_MARGIN_PERCENT` of
  the others plus `ALLOCATOR_MARGIN_EXPERTS` experts of `one_expert_bytes` (what the device allocator adds
  over the arrays it holds); `total` is the sum of all eight."""

  dense_bytes: int
  expert_bytes: int
  kv_cache_bytes: int
  staging_bytes: int
  workspace_bytes: int
  fallback_bytes: int = 0
  fallback_bits: int = 8  # of the copies, when there are any
  one_expert_bytes: int = 0  # of one expert in the plan's dtype (the allocator margin's chunk term)
  bank_read_bytes: int = 0
  allocator_bytes: int = dataclasses.field(init=False)
  total: int = dataclasses.field(init=False)

  def __post_init__(self):
    arrays = (self.dense_bytes + self.expert_bytes + self.kv_cache_bytes + self.staging_bytes + self.workspace_bytes
              + self.fallback_bytes + self.bank_read_bytes)
    object.__setattr__(self, "allocator_bytes", allocator_margin(arrays, self.one_expert_bytes))
    object.__setattr__(self, "total", arrays + self.allocator_bytes)

  def __str__(self) -> str:
    return (f"total {format_bytes(self.total)} = dense {format_bytes(self.dense_bytes)} + experts "
            f"{format_bytes(self.expert_bytes)} + kv cache {format_bytes(self.kv_cache_bytes)} + staging "
            f"{format_bytes(self.staging_bytes)} + workspace {format_bytes(self.workspace_bytes)} + "
            + (f"int{self.fallback_bits} fallback copies {format_bytes(self.fallback_bytes)} + "
               if self.fallback_bytes else "")
            + (f"experts read from host memory in a step {format_bytes(self.bank_read_bytes)} + "
               if self.bank_read_bytes else "")
            + f"allocator {format_bytes(self.allocator_bytes)}")


def kv_cache_bytes(config: SwitchConfig, dtype_bytes, batch: int, src_len: int, tgt_len: int) -> int:
  """Decoder caches in the model dtype: self-attention K,V [B,H,T,C] and cross K,V [B,H,S,C] per layer
  (a decoder-only model: K,V [B,Hkv,S+T,C] per layer, `config.kv_cache_elements`)."""
  if not config.is_encoder_decoder:
    return config.kv_cache_elements(batch, src_len, tgt_len) * dtype_size(dtype_bytes)
  per_position = 2 * batch * config.num_heads * config.d_kv
  return config.num_decoder_layers * per_position * (tgt_len + src_len) * dtype_size(dtype_bytes)


def workspace_bytes(config: SwitchConfig, batch: int, src_len: int, tgt_len: int) -> int:
  """A conservative estimate of activation memory at the peak of a generate call.

  Counted in float32 (`WORKSPACE_DTYPE_BYTES`) even for bf16 models, times `WORKSPACE_MARGIN`. The peak
  is the larger of two phases, since XLA frees one before the other runs:
    encoder over B*S tokens: residual, normed input, attention and FFN outputs [B,S,D] x4; q,k,v
      [B,S,H*C]; the FFN / expert intermediate [B,S,F]; router logits and probabilities [B,S,E] x2;
      attention scores and probabilities [B,H,S,S] x2; the position bias [H,S,S];
    one decode step: the same per-token tensors for B tokens; self and cross scores
      [B,H,T] + [B,H,S], x2; logits and log-probabilities [B,V] x2 (HF computes them in float32).
  The encoder also holds the MoE dispatch buffers (experts.py): tokens [K,C,D], the intermediate
  [K,C,F] and the outputs [K,C,D] with C = min(B*S, B*expert_capacity), counted with K = E, plus the
  [B*S, E] one-hot ranks. Teacher-forced scoring of all T positions at once ([B,T,V] logits) is not
  covered. A decoder-only family counts its own activations (`config.workspace_elements`: the prompt's
  prefill over B*S tokens, or one decode step over a cache of S+T positions), with the same dtype,
  margin and reserve.
  """
  if not config.is_encoder_decoder:
    elements = config.workspace_elements(batch, src_len, tgt_len)
    return math.ceil(elements * WORKSPACE_DTYPE_BYTES * WORKSPACE_MARGIN) + RUNTIME_RESERVE_BYTES
  c = config
  d, hc, f, e, h = c.d_model, c.inner_dim, c.d_ff, c.num_experts, c.num_heads
  per_token = 4 * d + 3 * hc + f + 2 * e
  encoder = batch * src_len * per_token + 2 * batch * h * src_len * src_len + h * src_len * src_len
  cap = min(batch * src_len, batch * c.expert_capacity)
  encoder += e * cap * (2 * d + f) + batch * src_len * e
  decode = batch * per_token + 2 * batch * h * (tgt_len + src_len) + h * tgt_len + 2 * batch * c.vocab_size
  activations = math.ceil(max(encoder, decode) * WORKSPACE_DTYPE_BYTES * WORKSPACE_MARGIN)
  return activations + RUNTIME_RESERVE_BYTES


def memory_breakdown(config: SwitchConfig, dtype_bytes: int | str | np.dtype, slots_per_layer: Sequence[int],
                     batch: int, src_len: int, tgt_len: int, staging_slots: int, devices: int = 1,
                     fallback: bool = False, bank_reads: int = 0) -> MemoryBreakdown:
  """Accelerator bytes of serving `config` with K_l = slots_per_layer[l] resident experts, on one device.

  Args:
    config: the model.
    dtype_bytes: bytes per weight element (2 for bfloat16), or a dtype name.
    slots_per_layer: K_l for each of the L MoE layers, in `config.moe_layers` order; 0 <= K_l <= E
      (a plan needs K_l >= 1; 0 gives the bytes of everything but the experts).
    batch, src_len, tgt_len: B, S and T (T counts every decoder position the cache holds).
    staging_slots: experts that can be in flight at once (device buffers for incoming copies).
    devices: n, the devices each layer's slot axis is split over (`sharding.py`): every K_l must then be
      a multiple of n, and the breakdown is that of each device, which holds K_l / n slots per layer
      and its own copy of everything else (dense weights, caches, staging, workspace are replicated).
    fallback: policy "fallback": count the int8 copies of every expert (`fallback_bytes`; with `devices`,
      each device holds those of E / n experts per layer); 4 or 8: copies of that many bits
      (`fallback_bits`).
    bank_reads: experts copied from host memory inside a step at once, under exact and selective routing
      (`bank_read_experts`; 0 for the other policies): `bank_read_bytes`, on each device.
  """
  size = dtype_size(dtype_bytes)
  slots = [int(k) for k in slots_per_layer]
  if len(slots) != config.num_moe_layers:
    raise ValueError(f"slots_per_layer has {len(slots)} entries; the model has {config.num_moe_layers} MoE layers")
  if any(not 0 <= k <= config.num_experts for k in slots):  # 0: accounting without experts
    raise ValueError(f"every K_l must be in [0, {config.num_experts}], got {slots}")
  for name, v in (("batch", batch), ("src_len", src_len), ("tgt_len", tgt_len)):
    if v <= 0:
      raise ValueError(f"{name} must be positive, got {v}")
  if staging_slots < 0:
    raise ValueError(f"staging_slots must be >= 0, got {staging_slots}")
  if bank_reads < 0:
    raise ValueError(f"bank_reads must be >= 0, got {bank_reads}")
  if devices < 1 or any(k % devices for k in slots):
    raise ValueError(f"every K_l must be a multiple of the {devices} devices its slots are split over, got {slots}")
  bits = fallback_bits(fallback)
  if bits and config.num_experts % devices:
    raise ValueError(f"the fallback copies of the {config.num_experts} experts of each MoE layer do not split "
                     f"evenly over {devices} devices")
  one_expert = expert_bytes_each(config, size)
  return MemoryBreakdown(
      dense_bytes=dense_bytes(config, size),
      expert_bytes=sum(slots) // devices * one_expert,
      kv_cache_bytes=kv_cache_bytes(config, size, batch, src_len, tgt_len),
      staging_bytes=staging_slots * one_expert,
      workspace_bytes=workspace_bytes(config, batch, src_len, tgt_len),
      fallback_bytes=fallback_bytes(config, bits) // devices if bits else 0,  # split on E like the bank
      fallback_bits=bits or 8,
      one_expert_bytes=one_expert,
      bank_read_bytes=bank_reads * one_expert,
  )


def min_budget_bytes(config: SwitchConfig, dtype_bytes: int | str | np.dtype, batch: int, src_len: int,
                     tgt_len: int, staging_slots: int, devices: int = 1, fallback: bool = False,
                     bank_reads: int = 0) -> int:
  """The smallest budget that runs at all: dense + one expert per layer + caches + staging + workspace
  (+ the int8 copies with `fallback`, the in-step copies with `bank_reads`; per device with `devices` >
  1: one slot per layer on each device)."""
  return memory_breakdown(config, dtype_bytes, [devices] * config.num_moe_layers, batch, src_len, tgt_len,
                          staging_slots, devices, fallback, bank_reads).total


def budget_for_experts(config: SwitchConfig, dtype_bytes: int | str | np.dtype, experts_per_layer: int, batch: int,
                       src_len: int, tgt_len: int, staging_slots: int, devices: int = 1,
                       fallback: bool = False, bank_reads: int = 0) -> int:
  """The budget in bytes whose uniform plan holds exactly `experts_per_layer` experts in every MoE layer
  (1 <= K <= E; K = E is the full model, which needs no staging): for sweeps over K instead of bytes,
  e.g. on a tiny model, whose every percentage of its weights is below the runtime reserve. With
  `devices`, per device (K a multiple of the device count). With `fallback`, K full-precision experts
  per layer plus the int8 copies of every expert (policy "fallback"); with `bank_reads`, plus the experts
  exact and selective routing copy from host memory inside a step."""
  if not 1 <= experts_per_layer <= config.num_experts:
    raise ValueError(f"experts_per_layer must be in [1, {config.num_experts}], got {experts_per_layer}")
  staging = 0 if experts_per_layer == config.num_experts else staging_slots
  reads = 0 if experts_per_layer == config.num_experts else bank_reads  # nothing is missing
  return memory_breakdown(config, dtype_bytes, [experts_per_layer] * config.num_moe_layers, batch, src_len, tgt_len,
                          staging, devices, fallback, reads).total


def device_memory_bytes(device) -> int | None:
  """Memory a device offers: its allocator's limit where the backend reports one (GPU, TPU), the host's
  physical memory for a CPU device, else None."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if getattr(device, "platform", None) == "cpu" and hasattr(os, "sysconf"):
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None
  return None


def check_fits_device(total_bytes: int, device) -> None:
  """Raises BudgetError when a plan's `total_bytes` exceed what `device` has (a budget above the
  device's memory would otherwise fail later, out of memory, halfway through loading)."""
  limit = device_memory_bytes(device)
  if limit is not None and total_bytes > limit:
    raise BudgetError(f"the plan needs {format_bytes(total_bytes)} ({total_bytes} bytes) on the device, but "
                      f"{getattr(device, 'device_kind', device)} has {format_bytes(limit)} ({limit} bytes); "
                      f"give a smaller budget")


def check_min_budget(budget_bytes: int, config: SwitchConfig, dtype_bytes, batch: int, src_len: int,
                     tgt_len: int, staging_slots: int, devices: int = 1, fallback: bool = False,
                     bank_reads: int = 0) -> None:
  """Raises BudgetError, stating the minimum, when `budget_bytes` cannot hold one expert per layer
  (on each of `devices` devices, `budget_bytes` then being per device), plus the int8 copies of every
  expert with `fallback`."""
  parts = memory_breakdown(config, dtype_bytes, [devices] * config.num_moe_layers, batch, src_len, tgt_len,
                           staging_slots, devices, fallback, bank_reads)
  if budget_bytes < parts.total:
    where = "" if devices == 1 else f" per device ({devices} devices, one slot per MoE layer on each)"
    raise BudgetError(
        f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the minimum "
        f"{format_bytes(parts.total)} ({parts.total} bytes){where} for batch {batch}, source {src_len}, "
        f"target {tgt_len}: {parts} (one expert per MoE layer, {staging_slots} staging slots"
        + (f", the int{fallback_bits(fallback)} copies of every expert)" if fallback_bits(fallback) else ")"))
