"""Random-weight models of the released shapes (`shapes.py`), planned for a request shape: what every
benchmark builds (speed and memory do not depend on the weight values, so none downloads checkpoints).

  build(cfg, dtype, policy, budget, batch=..., src_len=..., new_tokens=...)  -> Built(model, plan, ...)
  random_prompts(rng, cfg, batch, src_len)                                   -> ids, mask
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


_CHUNK = 1 << 22  # values per independent stream of `_normal`


def _normal(seq: np.random.SeedSequence, shape, std: float, dtype) -> np.ndarray:
  """An array ~ N(0, std) of `dtype`, drawn in chunks of `_CHUNK` values on all cores (numpy's
  generators release the GIL): switch-base-64's 3.8 G values took ~60 s on one core. Chunk i draws from
  the i-th child of `seq`, so the values do not depend on the number of threads."""
  import concurrent.futures

  n = int(np.prod(shape))
  out = np.empty(n, dtype)
  children = seq.spawn(max(1, -(-n // _CHUNK)))

  def fill(i):
    lo, hi = i * _CHUNK, min(n, (i + 1) * _CHUNK)
    x = np.random.default_rng(children[i]).standard_normal(hi - lo, np.float32)
    x *= std
    out[lo:hi] = x.astype(dtype)

  if len(children) == 1:
    fill(0)
  else:
    with concurrent.futures.ThreadPoolExecutor(min(len(children), os.cpu_count() or 1)) as ex:
      list(ex.map(fill, range(len(children))))
  return out.reshape(shape)


def random_model_parts(cfg, dtype, seed=0, pool=4, init="hf"):
  """A dense tree in the checkpoint layout and per-layer experts, random with the standard deviations
  Hugging Face initializes a Switch model with (`SwitchTransformersPreTrainedModel._init_weights`). A
  layer's E experts repeat a pool of `pool` random ones (pool >= E: every expert distinct, as in a real
  model, which timings of swaps need; pool=1: read-only broadcast views, no host memory, for quick
  runs); routing uses the random routers.

  init="flat" draws every projection with std 0.05 instead (what the benchmarks used before): attention
  logits then have a std near 15, softmax is a near-hard argmax, and outputs become sensitive to
  rounding. The scales matter for parity checks (`exact_parity.py`), not for speed."""
  import ml_dtypes  # noqa: F401  (numpy bfloat16)

  rng = np.random.default_rng(seed)
  npdt = np.dtype(dtype)
  seeds = np.random.SeedSequence(seed)

  def r(*shape, std=0.05):
    return _normal(seeds.spawn(1)[0], shape, std, npdt)

  def w(std):  # a projection's std under `init`
    return std if init == "hf" else 0.05

  d, hc, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
  kv = hc // cfg.num_heads
  attn = lambda: {"q": r(d, hc, std=w((d * kv) ** -0.5)), "k": r(d, hc, std=w(d**-0.5)),  # noqa: E731
                  "v": r(d, hc, std=w(d**-0.5)), "o": r(hc, d, std=w(hc**-0.5))}
  dense = {}
  if cfg.tie_word_embeddings:
    dense["shared"] = r(cfg.vocab_size, d, std=1.0)
  experts, norms = [], []
  for stack, n, sparse in (("encoder", cfg.num_layers, cfg.encoder_sparse_layers),
                           ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_layers)):
    blocks = {}
    for i in range(n):
      b = {"attn_norm": np.ones(d, npdt), "attn": attn(),
           "ffn_norm": np.ones(d, npdt)}
      if stack == "decoder":
        b["cross_norm"] = np.ones(d, npdt)
        b["cross"] = attn()
      if i in sparse:
        b["router"] = {"w": r(d, cfg.num_experts, std=1.0)}
        pool = min(pool, cfg.num_experts)
        base_wi, base_wo = r(pool, d, f, std=w(d**-0.5)), r(pool, f, d, std=w(d**-0.5))
        if pool == cfg.num_experts:
          experts.append((base_wi, base_wo))
        elif pool == 1:
          experts.append(tuple(np.broadcast_to(x, (cfg.num_experts,) + x.shape[1:]) for x in (base_wi, base_wo)))
        else:
          idx = np.arange(cfg.num_experts) % pool
          experts.append((base_wi[idx], base_wo[idx]))
        norms.append(rng.uniform(1.0, 2.0, cfg.num_experts).astype(np.float32))
      else:
        b["mlp"] = {"wi": r(d, f, std=w(d**-0.5)), "wo": r(f, d, std=w(f**-0.5))}
      blocks[str(i)] = b
    bias_std = d**-0.5 if init == "hf" else 1.0
    dense[stack] = {"rel_bias": r(cfg.relative_attention_num_buckets, cfg.num_heads, std=bias_std),
                    "final_norm": np.ones(d, npdt), "blocks": blocks}
  return dense, experts, np.stack(norms)


@dataclasses.dataclass
class Built:
  model: object  # a SwitchModel
  plan: object
  store: object  # HostExpertStore or ShardedExpertStore
  dense: dict
  budget_bytes: int | None
  full_bytes: int  # the fully resident model's bytes per device


def plan_for(cfg, dtype: str, policy: str, budget, *, batch: int, src_len: int, new_tokens: int,
             update_every: int | None = None, max_swaps: int | None = None, devices: int = 1,
             fallback_bits: int = 8):
  """(plan, budget bytes or None, full-model bytes per device) for `policy` under `budget` ("33%",
  "4GiB", "5/64" resident experts per layer, bytes, or "none"/None for no budget) at this request shape (`fallback_bits`: the copies of
  policy "fallback")."""
  import jax.numpy as jnp

  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import decode, loader
  from swapmoe_jax.serving import planner as planner_lib

  dbytes = jnp.dtype(loader.DTYPES[dtype]).itemsize
  full_bytes = budget_lib.full_model_bytes(cfg, dbytes, devices)
  shape = dict(batch=batch, src_len=src_len, tgt_len=decode.cache_length(new_tokens), devices=devices)
  budget_bytes = None if budget in (None, "none") else budget_lib.parse_budget(budget).resolve_for(
      cfg, dbytes, **shape, staging_slots=planner_lib.DEFAULT_MAX_SWAPS_PER_STEP if max_swaps is None else max_swaps,
      fallback=loader.routing_of(policy) == "fallback")
  if policy == "full":
    return planner_lib.plan_full(cfg, budget_bytes, dbytes, **shape), budget_bytes, full_bytes
  cadence = {k: v for k, v in dict(update_every=update_every, max_swaps_per_step=max_swaps).items() if v is not None}
  # the copies of policy "fallback" are counted before any slot
  fallback = fallback_bits if loader.routing_of(policy) == "fallback" else False
  return (planner_lib.plan_uniform(cfg, budget_bytes, dbytes, **shape, fallback=fallback, **cadence), budget_bytes,
          full_bytes)


def build(cfg, dtype: str, policy: str, budget, *, batch: int, src_len: int, new_tokens: int,
          update_every: int | None = None, max_swaps: int | None = None, pool: int = 4, init: str = "hf",
          mesh=None, parts=None, fallback_bits: int = 8, **assemble_kw) -> Built:
  """A random-weight model of `cfg` for `policy` under `budget`, through the planner and
  `loader.assemble` (as `load` builds one). `parts`: (dense, experts, norms) to reuse instead of
  drawing new ones; `mesh`: expert parallelism over its devices; `assemble_kw`: e.g. staging,
  steps_per_call, limits."""
  from swapmoe_jax.serving import loader, sharding
  from swapmoe_jax.serving.store import HostExpertStore

  jdtype = loader.DTYPES[dtype]
  dense, experts, norms = parts if parts is not None else random_model_parts(cfg, dtype, pool=pool, init=init)
  if mesh is None:
    staging = assemble_kw["staging"] = loader.resolve_staging(assemble_kw.get("staging", loader.DEFAULT_STAGING), cfg,
                                                              np.dtype(jdtype).itemsize)
    store = HostExpertStore.from_numpy(experts, norms, jdtype, pinned=loader.needs_pinned(policy, staging),
                                       banks=loader.needs_banks(policy, staging))  # as `load` builds it
  else:
    store = sharding.ShardedExpertStore.from_numpy(experts, norms, jdtype, mesh)
  del experts
  devices = 1 if mesh is None else len(sharding.mesh_devices(mesh))
  plan, budget_bytes, full_bytes = plan_for(cfg, dtype, policy, budget, batch=batch, src_len=src_len,
                                            new_tokens=new_tokens, update_every=update_every, max_swaps=max_swaps,
                                            devices=devices, fallback_bits=fallback_bits)
  if loader.routing_of(policy) == "fallback":
    assemble_kw["fallback_bits"] = fallback_bits
  model = loader.assemble(cfg, dense, store, plan, policy=policy, gate_mode="original", dtype=jdtype, mesh=mesh,
                          **assemble_kw)
  return Built(model, plan, store, dense, budget_bytes, full_bytes)


def random_prompts(rng: np.random.Generator, cfg, batch: int, src_len: int, ragged: bool = False):
  """Random prompts: int32 ids [batch, src_len] and their bool mask; `ragged` draws each row's length
  from [src_len / 4, src_len] and pads the rest."""
  ids = rng.integers(2, cfg.vocab_size, (batch, src_len)).astype(np.int32)
  if not ragged:
    return ids, np.ones((batch, src_len), bool)
  lengths = rng.integers(max(1, src_len // 4), src_len + 1, batch)
  mask = np.arange(src_len)[None, :] < lengths[:, None]
  return np.where(mask, ids, cfg.pad_token_id).astype(np.int32), mask
