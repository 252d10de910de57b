"""`load(folder)`: a converted checkpoint -> a ready `SwitchModel` (weights split, experts in host memory)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax import decode
from swapmoe_jax.config import SwitchConfig
from swapmoe_jax.engine import SwitchModel
from swapmoe_jax.model import SwitchTransformer
from swapmoe_jax.store import HostExpertStore

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _norm(w):
  return {"weight": w}


def nnx_tree_from_dense(cfg: SwitchConfig, dense: dict) -> dict:
  """Checkpoint dense tree (see `checkpoint.py`) -> the pure dict of `SwitchTransformer`'s params
  (experts excluded: those are slots)."""
  out = {"shared": dense["shared"]}
  if not cfg.tie_word_embeddings:
    out["lm_head"] = dense["lm_head"]
  for stack in ("encoder", "decoder"):
    src = dense[stack]
    blocks = {}
    for key, blk in src["blocks"].items():
      b = {"attn_norm": _norm(blk["attn_norm"]), "attn": dict(blk["attn"]), "ffn_norm": _norm(blk["ffn_norm"])}
      if "cross" in blk:
        b["cross_norm"] = _norm(blk["cross_norm"])
        b["cross"] = dict(blk["cross"])
      if "router" in blk:
        b["moe"] = {"router_w": np.asarray(blk["router"]["w"], np.float32)}
        if "b" in blk["router"]:
          b["moe"]["router_b"] = np.asarray(blk["router"]["b"], np.float32)
      else:
        b["mlp"] = dict(blk["mlp"])
      blocks[int(key)] = b
    out[stack] = {"rel_bias": src["rel_bias"], "final_norm": _norm(src["final_norm"]), "blocks": blocks}
  return out


def _fill(abstract: dict, values: dict, path=()) -> dict:
  """Replaces every leaf of the abstract pure dict with the matching value, checking shapes."""
  out = {}
  for k, a in abstract.items():
    p = path + (k,)
    if k not in values:
      raise ckpt.CheckpointError(f"checkpoint has no tensor for {'/'.join(map(str, p))}")
    v = values[k]
    if isinstance(a, dict):
      out[k] = _fill(a, v, p)
    else:
      v = np.asarray(v)
      if tuple(v.shape) != tuple(a.shape):
        raise ckpt.CheckpointError(f"{'/'.join(map(str, p))}: checkpoint shape {v.shape}, model expects {a.shape}")
      out[k] = jnp.asarray(v, dtype=a.dtype)
  return out


def build_model(cfg: SwitchConfig, dense: dict, store: HostExpertStore, *, dtype=jnp.float32,
                slots_per_layer=None, resident=None, routing="masked", gate_mode="original"):
  """Builds (graphdef, params, slots) with the given resident experts per MoE layer.

  resident: per MoE layer, int array [K_l] of the experts placed in slots 0..K_l-1 (default: 0..K_l-1).
  """
  slots_per_layer = tuple(slots_per_layer or [cfg.num_experts] * cfg.num_moe_layers)
  abstract = nnx.eval_shape(lambda: SwitchTransformer(
      cfg, slots_per_layer=slots_per_layer, routing=routing, gate_mode=gate_mode, dtype=dtype))
  graphdef, params, slots = decode.split_model(abstract)
  pure = nnx.to_pure_dict(params)
  values = nnx_tree_from_dense(cfg, dense)
  for l, (stack, i) in enumerate(cfg.moe_layers):
    values[stack]["blocks"][i]["moe"]["norms"] = store.norms[l]
  nnx.replace_by_pure_dict(params, _fill(pure, values))
  slot_pure = nnx.to_pure_dict(slots)
  if resident is None:
    resident = [np.arange(k) for k in slots_per_layer]
  for l, (stack, i) in enumerate(cfg.moe_layers):
    experts = np.asarray(resident[l], np.int32)
    wi, wo = store.gather_to_device(l, experts)
    slot_of = np.full((cfg.num_experts,), -1, np.int32)
    slot_of[experts] = np.arange(len(experts), dtype=np.int32)
    slot_pure[stack]["blocks"][i]["moe"] = {"wi": wi.astype(dtype), "wo": wo.astype(dtype), "slot_of": jnp.asarray(slot_of)}
  nnx.replace_by_pure_dict(slots, slot_pure)
  return graphdef, params, slots


def load(folder: str | os.PathLike, *, dtype: str | None = None, policy: str = "full", progress: bool = False):
  """Loads a converted checkpoint (see `python -m checkpoints_conv`).

  Args:
    folder: a folder written by the converter.
    dtype: "float32" or "bfloat16" (default: the checkpoint's).
    policy: expert residency policy; "full" keeps every expert on the device.
    progress: show a progress bar while experts are read.
  """
  meta = ckpt.read_metadata(folder)
  dtype_name = dtype or meta.dtype
  if dtype_name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
  if policy != "full":
    raise ValueError(f"unknown policy {policy!r}; supported: full")
  jdtype = DTYPES[dtype_name]
  cfg = meta.config
  dense = ckpt.restore_dense(meta)
  experts = ckpt.restore_all_experts(meta, progress=progress)
  store = HostExpertStore.from_numpy(experts, meta.expert_norms, jdtype)
  graphdef, params, slots = build_model(cfg, dense, store, dtype=jdtype)
  return SwitchModel(cfg, graphdef, params, slots, dtype=jdtype, store=store, tokenizer=_tokenizer(meta),
                     policy=policy, meta=meta)


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
