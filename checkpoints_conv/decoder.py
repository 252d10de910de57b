"""Streams a decoder-only MoE source (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) into a checkpoint folder.

The name mapping is `decoder_rules.RULES`. As for SwitchTransformers (`convert._write`), tensors are
read one at a time and each MoE layer's experts are written as soon as the layer is complete, so
memory holds the dense weights plus about one layer of experts. An expert's wi [D, 2F] is the
concatenation of its gate and up matrices (transposed), whether they come one by one
(`experts.{j}.gate_proj`, Mixtral's `w1`/`w3`) or fused (`experts.gate_up_proj` [E, 2F, D]).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from checkpoints_conv import decoder_rules as dr
from checkpoints_conv import rules
from checkpoints_conv.errors import ConversionError
from checkpoints_conv.sources import WeightReader
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.models.decoder.config import DecoderConfig

_PARTS = (("wi", dr.GATE), ("wi", dr.UP), ("wo", None))  # what one expert needs
_PART_NAMES = {("wi", dr.GATE): "gate", ("wi", dr.UP): "up", ("wo", None): "down"}


def write(tmp: str, reader: WeightReader, cfg: DecoderConfig, dtype: str,
          progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Streams every tensor of `reader`: experts into `tmp`/experts/ layer by layer, the rest returned.

  Args:
    tmp: the output folder being written.
    reader: the source tensors.
    cfg: the `DecoderConfig` of the source.
    dtype: key of `checkpoint.DTYPES`, the dtype of every stored array.
    progress: show a progress bar.

  Returns:
    (dense, norms): the dense tree flattened to {"blocks.0.attn.q": array, ...} ([in, out] layout,
    `dtype`), and the expert norms ‖E_i‖ = sqrt(‖gate‖_F² + ‖up‖_F² + ‖down‖_F²) — the Frobenius norm of
    the expert's (wi, wo), as for Switch — float32[num_moe_layers, E], summed in float64 from the
    float32 source values.
  """
  from tqdm.auto import tqdm

  table = dr.Table(cfg)
  out_dtype = ckpt.DTYPES[dtype]
  E, F = cfg.num_experts, cfg.moe_d_ff
  layer_of = {block: n for n, (_, block) in enumerate(cfg.moe_layers)}
  sumsq = np.zeros((cfg.num_moe_layers, E), np.float64)
  dense: dict[str, np.ndarray] = {}
  halves: dict[str, dict[int, np.ndarray]] = {}  # dense wi matrices by part, joined at the end
  pending: dict[int, dict[int, dict[tuple, np.ndarray]]] = {}  # block -> expert -> part -> [in, out]
  given: dict[tuple, str] = {}  # (block, expert, part) -> source tensor name
  written: set[int] = set()
  tied: dict[str, np.ndarray] = {}
  embed32 = None
  seen: dict[str, str] = {}
  os.makedirs(os.path.join(tmp, ckpt.EXPERTS_DIR))

  def add(block: int, j: int, part: tuple, y: np.ndarray, name: str) -> None:
    if block in written or (block, j, part) in given:
      first = given.get((block, j, part), "earlier tensors")
      raise ConversionError(f"tensor {name} gives the {_PART_NAMES[part]} matrix of expert {j} of block {block} "
                            f"again (already from {first}): a source holds experts either one by one or fused")
    given[block, j, part] = name
    pending.setdefault(block, {}).setdefault(j, {})[part] = y

  bar = tqdm(reader, total=reader.count, desc="converting", unit="tensor", disable=not progress)
  for t in bar:
    if t.name in seen:
      raise ConversionError(f"tensor {t.name} appears twice: in {seen[t.name]} and {t.file}")
    seen[t.name] = t.file
    try:
      m = table.match(t.name)
    except rules.Unexpected as e:
      raise ConversionError(f"unexpected tensor {t.name} in {t.file}: {e}") from None
    if m is None:
      raise ConversionError(f"unknown tensor {t.name} in {t.file}: not a {cfg.model_type} weight")
    rule = m.rule
    want = rule.shape(cfg)
    if t.shape != want:
      if (rule.kind == dr.FUSED or m.dest.endswith(".router.w")) and t.shape[1:] == want[1:]:
        raise ConversionError(f"expert count mismatch: {t.name} in {t.file} has {t.shape[0]} experts, "
                              f"config.json says num_experts={E}")
      raise ConversionError(f"shape mismatch for {t.name} in {t.file}: the file has {list(t.shape)}, "
                            f"config.json implies {list(want)}")
    x = t.load()
    if rule.kind == dr.TIED:
      tied[t.name] = x
      continue
    if m.dest == "embed":
      embed32 = x
    if rule.kind == dr.DENSE:
      y = np.ascontiguousarray(x.T if rule.transpose else x, dtype=out_dtype)
      if rule.part is None:
        dense[m.dest] = y
      else:
        halves.setdefault(m.dest, {})[rule.part] = y
      continue
    block = int(m.binding["i"])
    if rule.kind == dr.EXPERT:
      j = int(m.binding["j"])
      flat = x.ravel().astype(np.float64)
      sumsq[layer_of[block], j] += float(flat @ flat)
      add(block, j, (rule.dest, rule.part), np.ascontiguousarray(x.T, dtype=out_dtype), t.name)
    else:  # FUSED: [E, 2F, D] or [E, D, F]
      sumsq[layer_of[block]] += np.einsum("eab,eab->e", x, x, dtype=np.float64)
      for j in range(E):
        if rule.dest == "wi":
          add(block, j, ("wi", dr.GATE), np.ascontiguousarray(x[j, :F].T, dtype=out_dtype), t.name)
          add(block, j, ("wi", dr.UP), np.ascontiguousarray(x[j, F:].T, dtype=out_dtype), t.name)
        else:
          add(block, j, ("wo", None), np.ascontiguousarray(x[j].T, dtype=out_dtype), t.name)
    experts = pending[block]
    if len(experts) == E and all(len(parts) == len(_PARTS) for parts in experts.values()):
      bar.set_postfix_str(f"writing {ckpt.layer_dirname('decoder', block)}")
      ckpt.save_tree(os.path.join(tmp, ckpt.EXPERTS_DIR, ckpt.layer_dirname("decoder", block)),
                     {ckpt.expert_key(j): _expert(parts) for j, parts in sorted(experts.items())})
      del pending[block]
      written.add(block)
  bar.close()
  _check_complete(table, seen, pending, written, reader.folder)
  _check_tied(tied, embed32)
  for dest, parts in halves.items():
    dense[dest] = np.concatenate([parts[dr.GATE], parts[dr.UP]], axis=1)
  return dense, np.sqrt(sumsq).astype(np.float32)


def _expert(parts: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
  """{"wi": [D, 2F] = concat(gate, up; rows).T, "wo": [F, D]} from the [in, out] parts."""
  return {"wi": np.concatenate([parts["wi", dr.GATE], parts["wi", dr.UP]], axis=1), "wo": parts["wo", None]}


def _check_complete(table: dr.Table, seen: dict[str, str], pending: dict, written: set[int], folder: str) -> None:
  cfg = table.cfg
  for block, experts in sorted(pending.items()):
    have = sorted(experts)
    if have == list(range(len(have))) and len(have) < cfg.num_experts and all(
        len(p) == len(_PARTS) for p in experts.values()):
      raise ConversionError(f"expert count mismatch: config.json says num_experts={cfg.num_experts}, but the "
                            f"weights in {folder} have {len(have)} experts in block {block}")
    for j in range(cfg.num_experts):
      absent = [p for p in _PARTS if p not in experts.get(j, {})]
      if absent:
        raise ConversionError(f"missing tensor: the {_PART_NAMES[absent[0]]} matrix of expert {j} of block "
                              f"{block} ({_expert_source(table, block, j, absent[0])}) in {folder}")
  missing = sorted(table.required_names() - {table.canonical(n) for n in seen})
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"missing tensor {missing[0]}{more} in {folder}")
  for _, block in cfg.moe_layers:
    if block not in written and block not in pending:
      raise ConversionError(f"missing tensor {_expert_source(table, block, 0, _PARTS[0])} (or the fused "
                            f"experts.gate_up_proj and experts.down_proj) in {folder}: block {block} has no experts")


def _expert_source(table: dr.Table, block: int, j: int, part: tuple) -> str:
  """The per-expert HF name holding `part` of expert `j` of `block`."""
  for rule in dr.RULES:
    if rule.kind == dr.EXPERT and (rule.dest, rule.part) == part and rule.scope(table.cfg):
      return rule.source.format(i=block, j=j)
  raise AssertionError(part)


def _check_tied(tied: dict[str, np.ndarray], embed32: np.ndarray | None) -> None:
  for name, x in sorted(tied.items()):
    if not np.array_equal(x, embed32):
      # transformers ties lm_head to the input embedding on load, whatever the file holds.
      warnings.warn(f"{name} differs from model.embed_tokens.weight; ignored, as transformers does with "
                    f"tie_word_embeddings=true", stacklevel=4)
