"""Expert FFNs computed from a fixed-shape slot buffer, exact-routing misses from host memory, and
fallback-routing misses from int8 copies on the device (`expert_ffn_fallback`).

Two dispatch implementations, chosen by the (static) token count:
- gather: each token gathers its expert's weights by slot — few tokens (decode steps);
- dispatch: tokens scattered into a [K, C, D] buffer (C = per-slot capacity), one batched matmul per
  weight, results gathered back (Switch / T5X style) — many tokens (prefill). The weights are read in
  place: `lax.ragged_dot` was measured on an H200 to add ~0.5 GiB of transient device memory per
  switch-base-64 layer (a copy of the slot buffer), which would break the memory budget.
Both compute the same function; a test asserts they agree.

The gather path reads each row's expert in one of three ways, chosen by the expert's size (static):
- rows: a dynamic slice of the slot buffer per row feeding its two products. XLA copies the slice first,
  harmless for small experts;
- branches (experts of `BIG_EXPERT_BYTES` or more, fewer rows than slots): per row, a `lax.switch` over
  the slots whose branches read a static slot, which XLA reads in place;
- all slots (big experts, at least as many rows as slots): every slot's expert for every row, each row
  taking its own: the K experts are read once, instead of once per row.
Measured in one run of `benchmarks/expert_kernels.py` on an H200 (16-step calls, bf16): Mixtral's expert
(D 4096, F 14336, SwiGLU, 336 MiB), 2 rows, 8 slots, 4 layers: 4.14 ms a step stacking the rows' experts
(the implementation before), 2.14 by dynamic slices, 0.97 by branches (2.9 TB/s); 8 rows: 8.23, 8.47,
3.69 and 2.72 ms by all slots. switch-base's expert (9 MiB), 17 slots, 8 rows: 0.54 ms stacked, 0.21 by
dynamic slices, 2.07 by branches (a conditional per row per layer costs more than it saves); 1 row: 0.054
and 0.060 ms.

Expert weights are kept the way torch's Linear stores them, [out, in]: per expert wi [F, D] and
wo [D, F] (slot buffers wi [K, F, D], wo [K, D, F]), so that every product contracts the minor axis.
A GLU expert (Mixtral, Qwen-MoE, OLMoE) keeps the same two matrices, wi [2F, D] holding the gate rows
then the up rows (HF's fused `gate_up_proj`): `act` here is the function from wi·x to the hidden
activations, `activations.gated(act)` for GLU, so that every path below serves both kinds unchanged.
Top-k routing flattens token-choice pairs into the N rows (a token repeated k times); since a token
picks an expert at most once, no slot gets more pairs than there are tokens.
Measured in one run of `benchmarks/ffn_layouts.py --slots 64` on an H200 (switch-base-64's decoder: six
MoE layers, 16 steps per call): with [in, out] rows XLA copied every slot buffer into this orientation
at 8 tokens (+3.4 GiB of temporaries, past any budget), and a 1-token step took 0.184 ms against
0.055 ms in this orientation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swapmoe_jax.moe import quant

GATHER_MAX_TOKENS = 16
BIG_EXPERT_BYTES = 64 << 20  # experts this large are read by static slot (branches / all slots), see above
# Exact and selective routing read a decode step's misses from host memory one copy per row, all at
# once, while those copies take at most this many bytes; else, and in the prefill, one expert at a time.
MISS_ROWS_MAX_BYTES = 256 << 20


def reads_misses_by_row(num_rows: int, expert_bytes: int, decode: bool) -> bool:
  """Whether `expert_ffn_misses` copies one expert per row, all at once (a decode step of at most
  `GATHER_MAX_TOKENS` rows whose experts take at most `MISS_ROWS_MAX_BYTES` together), rather than one
  missing expert at a time, each once (the prefill; big experts). The device then holds `num_rows` or
  one of the copies at once, which plans count (`budget.bank_read_experts`)."""
  return decode and num_rows <= GATHER_MAX_TOKENS and num_rows * expert_bytes <= MISS_ROWS_MAX_BYTES


def _rows(w, idx):
  """w[idx] for a few indices as dynamic slices: reads N experts, where a gather over the slot axis was
  measured on an H200 to cost as much as reading the whole slot buffer (1.6 vs 0.9 ms per
  switch-base-64 decode step at K = 64 vs 19)."""
  return jnp.stack([jax.lax.dynamic_index_in_dim(w, idx[i], keepdims=False) for i in range(idx.shape[0])])


def _expert_bytes(wi, wo) -> int:
  """Bytes of one expert of stacked buffers wi [K, ...], wo [K, ...] (slots or a host bank), from their
  shapes alone: no op on the arrays (a host bank stays untouched)."""
  return sum((w.size // w.shape[0]) * w.dtype.itemsize for w in (wi, wo))


def gather_impl(num_rows: int, num_slots: int, expert_bytes: int) -> str:
  """How `_ffn_gather` reads the rows' experts (module docstring): "rows", "branches" or "all_slots"."""
  if expert_bytes < BIG_EXPERT_BYTES:
    return "rows"
  return "all_slots" if num_rows >= num_slots else "branches"


def _ffn_gather(x, slot, wi, wo, act, impl: str | None = None):
  """x: [N, D]; slot: int32[N] (valid); wi: [K, F, D]; wo: [K, D, F] -> [N, D]. `impl`: see
  `gather_impl` (default: chosen by the expert's size)."""
  n, k = x.shape[0], wi.shape[0]
  if impl is None:
    impl = gather_impl(n, k, _expert_bytes(wi, wo))
  if impl == "rows":
    return jnp.stack([act(jax.lax.dynamic_index_in_dim(wi, slot[i], keepdims=False) @ x[i])
                      @ jax.lax.dynamic_index_in_dim(wo, slot[i], keepdims=False).T for i in range(n)])
  if impl == "branches":
    branches = [lambda xi, e=e: act(wi[e] @ xi) @ wo[e].T for e in range(k)]
    return jnp.stack([jax.lax.switch(slot[i], branches, x[i]) for i in range(n)])
  if impl == "all_slots":
    y = jnp.einsum("nkf,kdf->nkd", act(jnp.einsum("nd,kfd->nkf", x, wi)), wo)
    return jnp.take_along_axis(y, slot[:, None, None], axis=1)[:, 0]
  raise ValueError(f"unknown gather implementation {impl!r}")


def _ffn_dispatch(x, slot, wi, wo, act, keep, capacity):
  """Per slot, up to `capacity` kept tokens in position order; others get 0."""
  num_slots = wi.shape[0]
  one_hot = jax.nn.one_hot(slot, num_slots, dtype=jnp.int32) * keep[:, None].astype(jnp.int32)  # [N, K]
  pos = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1  # rank of the token in its slot
  pos = jnp.where(keep & (pos >= 0) & (pos < capacity), pos, capacity)  # `capacity` = out of range: dropped
  buf = jnp.zeros((num_slots, capacity, x.shape[1]), x.dtype).at[slot, pos].set(x, mode="drop")
  h = act(jnp.einsum("kcd,kfd->kcf", buf, wi))
  y = jnp.einsum("kcf,kdf->kcd", h.astype(wo.dtype), wo)
  return y.at[slot, pos].get(mode="fill", fill_value=0)


def dispatch_capacity(num_tokens: int, batch: int, capacity: int) -> int:
  """C of the dispatch buffer: HF's capacity is per batch row, so no slot keeps more than B * capacity."""
  return min(num_tokens, batch * capacity)


def expert_ffn(x: jax.Array, slot: jax.Array, wi: jax.Array, wo: jax.Array, act, *, keep: jax.Array | None = None,
               capacity: int | None = None, grouped: bool | None = None):
  """Each kept token through the expert in its slot. x: [N, D]; slot: int32[N] in [0, K); wi: [K, F or
  2F, D]; wo: [K, D, F]; act: wi·x [..., F or 2F] -> hidden [..., F]; keep: bool[N] (default all);
  capacity: most tokens any slot keeps (default N). Returns [N, D] (0 where not kept by the dispatch
  path; the caller zeroes dropped tokens in either path)."""
  n = x.shape[0]
  if grouped is None:
    grouped = n > GATHER_MAX_TOKENS
  if not grouped:
    return _ffn_gather(x, slot, wi, wo, act)
  keep = jnp.ones((n,), bool) if keep is None else keep
  return _ffn_dispatch(x, slot, wi, wo, act, keep, n if capacity is None else min(capacity, n))


def _to_device(x: jax.Array) -> jax.Array:
  return jax.device_put(x, jax.memory.Space.Device)


def _serve_misses(x, expert, miss, num_experts: int, rows_ffn, one_ffn, by_row: bool):
  """The tokens whose expert is not resident, each through its expert, the rest 0 ([N, D]).

  `by_row` (few tokens): `rows_ffn(x, expert)` computes every row with its own expert, only when some
  row misses (a `lax.cond`). Else (many tokens): a scan over the E experts, `one_ffn(x, e)` (every row
  through expert e) only for the experts with a miss. The weights come from wherever the two functions
  read them: the host bank (`expert_ffn_misses`) or the int8 copies (`expert_ffn_fallback`)."""
  if by_row:
    y = jax.lax.cond(jnp.any(miss), lambda _: rows_ffn(x, expert), lambda _: jnp.zeros_like(x), None)
    return jnp.where(miss[:, None], y, 0)

  def body(acc, e):
    sel = miss & (expert == e)

    def compute(_):
      return jnp.where(sel[:, None], one_ffn(x, e), 0).astype(x.dtype)

    return acc + jax.lax.cond(jnp.any(sel), compute, lambda _: jnp.zeros_like(x), None), None

  acc, _ = jax.lax.scan(body, jnp.zeros_like(x), jnp.arange(num_experts, dtype=jnp.int32))
  return acc


def expert_ffn_misses(
    x: jax.Array,
    expert: jax.Array,
    miss: jax.Array,
    bank_wi: jax.Array,
    bank_wo: jax.Array,
    act,
    decode: bool = True,
) -> jax.Array:
  """Tokens whose expert is not resident, served from the host bank inside the step (exact routing).

  x: [N, D]; expert: int32[N]; miss: bool[N]; bank_wi: [E, F or 2F, D]; bank_wo: [E, D, F] (host memory,
  e.g. `pinned_host`); act as in `expert_ffn`; decode: the N rows are one decode step's (False: a
  prefill's). With top-k routing the N rows are token-choice pairs. Only missing experts are copied:
  one per row in a decode step of few rows (`reads_misses_by_row`), one expert at a time otherwise.
  Returns [N, D], zero for tokens that are not misses.
  """
  def rows_ffn(x, expert):
    n = x.shape[0]
    wi = jnp.stack([_to_device(jax.lax.dynamic_index_in_dim(bank_wi, expert[i], keepdims=False)) for i in range(n)])
    wo = jnp.stack([_to_device(jax.lax.dynamic_index_in_dim(bank_wo, expert[i], keepdims=False)) for i in range(n)])
    h = act(jnp.einsum("nd,nfd->nf", x, wi))
    return jnp.einsum("nf,ndf->nd", h, wo)

  def one_ffn(x, e):
    wi = _to_device(jax.lax.dynamic_index_in_dim(bank_wi, e, keepdims=False))
    wo = _to_device(jax.lax.dynamic_index_in_dim(bank_wo, e, keepdims=False))
    return act(x @ wi.T) @ wo.T

  by_row = reads_misses_by_row(x.shape[0], _expert_bytes(bank_wi, bank_wo), decode)
  return _serve_misses(x, expert, miss, bank_wi.shape[0], rows_ffn, one_ffn, by_row)


def _int8_matmul(x, q, scale, spec):
  """x through int8 weights with per-output-channel scales, the scale applied to the outputs
  (x @ (q·s).T = (x @ q.T)·s: the weights are never dequantized in memory). spec: "ni,oi->no" for one
  matrix q int8 [out, in], scale float32 [out]; "ni,noi->no" for one matrix per row, q [N, out, in],
  scale [N, out]. x: [N, in] -> [N, out] in x.dtype (the int8 values are exact in bfloat16). Packed
  int4 pairs (q [..., in / 2], `quant.py`) are unpacked to their int8 values first, inside the step."""
  if quant.is_packed(q, x.shape[-1]):
    q = quant.unpack_int4(q)
  y = jnp.einsum(spec, x, q.astype(x.dtype))
  return (y.astype(jnp.float32) * scale).astype(x.dtype)


def expert_ffn_fallback(
    x: jax.Array,
    expert: jax.Array,
    miss: jax.Array,
    fallback: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    act,
) -> jax.Array:
  """Tokens whose expert is not resident, computed with the expert's int8 copy on the device (fallback
  routing, `quant.py`).

  x: [N, D]; expert: int32[N]; miss: bool[N]; fallback: (wi_q int8 [E, F or 2F, D], wi_scale float32
  [E, F or 2F], wo_q int8 [E, D, F], wo_scale float32 [E, D]); act as in `expert_ffn`. With top-k
  routing the N rows are token-choice pairs. Few tokens (decode) read the N wanted experts' rows by
  dynamic slices (as `_rows`); many tokens (prefill) scan over the E experts, computing only those
  with a miss. Returns [N, D], zero for tokens that are not misses.
  """
  wi_q, wi_s, wo_q, wo_s = fallback

  def rows_ffn(x, expert):
    h = act(_int8_matmul(x, _rows(wi_q, expert), _rows(wi_s, expert), "ni,noi->no"))
    return _int8_matmul(h.astype(x.dtype), _rows(wo_q, expert), _rows(wo_s, expert), "ni,noi->no")

  def one_ffn(x, e):
    one = lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # noqa: E731
    h = act(_int8_matmul(x, one(wi_q), one(wi_s), "ni,oi->no"))
    return _int8_matmul(h.astype(x.dtype), one(wo_q), one(wo_s), "ni,oi->no")

  return _serve_misses(x, expert, miss, wi_q.shape[0], rows_ffn, one_ffn, x.shape[0] <= GATHER_MAX_TOKENS)
