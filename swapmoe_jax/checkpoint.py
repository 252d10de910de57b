"""The on-disk format of a converted checkpoint: reader, shared constants and writer helpers.

A converted folder (written by `python -m checkpoints_conv`, read here)::

  out/
    swapmoe.json          # metadata, see `write_metadata`
    dense/                # one Orbax PyTree checkpoint: every weight except the experts
    experts/encoder_001/  # one Orbax PyTree checkpoint per MoE layer:
                          #   {"e0000": {"wi": [D, F], "wo": [F, D]}, "e0001": ...}
    tokenizer/            # the source's tokenizer files, when it had them
    generation_config.json  # the source's, when it had one

Dense tree (nested dicts of numpy arrays; matrices are stored [in, out], i.e. torch Linear transposed)::

  {"shared": [V, D], "lm_head": [D, V] (only when not tie_word_embeddings),
   "encoder": {"rel_bias": [NB, H], "final_norm": [D], "blocks": {"0": BLOCK, "1": BLOCK, ...}},
   "decoder": {same}}
  BLOCK: {"attn_norm": [D], "attn": {"q": [D, H*C], "k": [D, H*C], "v": [D, H*C], "o": [H*C, D]},
          "ffn_norm": [D], and either "mlp": {"wi": [D, F], "wo": [F, D]} (dense block)
          or "router": {"w": [D, E]} plus "b": [E] iff config.router_bias (sparse block)}
  decoder BLOCK: the same plus "cross_norm": [D], "cross": {"q", "k", "v", "o"}

NB is `relative_attention_num_buckets`.

Decoder-only families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; config `models.decoder.config.DecoderConfig`,
swapmoe.json "family": "decoder") use the same folders with gated experts and their own dense tree::

  experts/decoder_003/    # {"e0000": {"wi": [D, 2F] (gate columns, then up), "wo": [F, D]}, ...}
  {"embed": [V, D], "lm_head": [D, V] (only when not tie_word_embeddings), "final_norm": [D],
   "blocks": {"0": BLOCK, ...}}
  BLOCK: {"attn_norm": [D], "attn": {"q": [D, H*C], "k": [D, G*C], "v": [D, G*C], "o": [H*C, D],
          "q_b": [H*C], "k_b", "v_b": [G*C] iff attention_bias, "o_b": [D] iff output_bias,
          "q_norm": [C] or [H*C], "k_norm": [C] or [G*C] iff qk_norm ("head" or "full")},
          "ffn_norm": [D], and either "mlp": {"wi": [D, 2F], "wo": [F, D]} (dense block)
          or "router": {"w": [D, E]} plus "shared": {"wi": [D, 2Fs], "wo": [Fs, D], "gate": [D, 1]}
          iff shared_d_ff (sparse block)}

G is the number of key/value heads. Experts live apart from the dense tree so that the loader can
read them once into host memory, and so that one expert can be read alone (`restore_experts`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from swapmoe_jax.models.switch.config import ConfigError, SwitchConfig, read_json_object

if TYPE_CHECKING:
  from swapmoe_jax.models.decoder.config import DecoderConfig

FORMAT_VERSION = 1
METADATA_FILE = "swapmoe.json"
FAMILY_SWITCH, FAMILY_DECODER = "switch", "decoder"  # swapmoe.json "family"; absent means switch
FILES_KEY = "files"  # in swapmoe.json: {relative path: bytes} of every other file (optional in version 1)
DENSE_DIR = "dense"
EXPERTS_DIR = "experts"
TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG_FILE = "generation_config.json"
# Beside a converted checkpoint (written after it, so not in its file list): expert importance measured
# on calibration prompts, which `load`'s planner uses by default (`write_calibration`).
CALIBRATION_FILE = "calibration.json"
# Files copied into tokenizer/ when the source has them; the first ones are the vocabularies (one of
# them must be present), then what a tokenizer needs beside them: BPE merges, special tokens, and the
# chat template (transformers 5 writes it to chat_template.jinja, older ones into tokenizer_config.json
# or chat_template.json).
TOKENIZER_VOCAB_FILES = ("spiece.model", "tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = TOKENIZER_VOCAB_FILES + (
    "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json")
DTYPES: dict[str, Any] = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
  """A converted checkpoint folder that cannot be read."""


def expert_key(j: int) -> str:
  """Key of expert `j` in a layer's expert tree: "e0000", "e0001", ..."""
  return f"e{j:04d}"


def layer_dirname(stack: str, block: int) -> str:
  """Folder (under experts/) of the MoE layer in block `block` of `stack`: "encoder_001"."""
  return f"{stack}_{block:03d}"


def expert_shapes(config: SwitchConfig | DecoderConfig) -> tuple[tuple[int, int], tuple[int, int]]:
  """On-disk shapes (wi, wo) of one expert: Switch ([D, F], [F, D]); gated families ([D, 2F], [F, D])."""
  if isinstance(config, SwitchConfig):
    return (config.d_model, config.d_ff), (config.d_ff, config.d_model)
  return (config.hidden_size, 2 * config.moe_d_ff), (config.moe_d_ff, config.hidden_size)


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  """What `swapmoe.json` says about a converted folder, validated against the folder.

  Attributes:
    folder: absolute path of the converted folder.
    format_version: the format version that wrote it (<= FORMAT_VERSION).
    config: the model configuration: a `SwitchConfig`, or a `DecoderConfig` for the decoder-only families.
    dtype: "float32" or "bfloat16", the dtype of every stored array.
    expert_norms: float32[num_moe_layers, E], ‖E_i‖ per MoE layer in `moe_layers` order.
    moe_layers: ((stack, block), ...), equal to `config.moe_layers`.
    tokenizer_dir: the tokenizer folder, or None when the source had no tokenizer.
    hf_config: the source's original `config.json` dict.
  """

  folder: str
  format_version: int
  config: SwitchConfig | DecoderConfig
  dtype: str
  expert_norms: np.ndarray
  moe_layers: tuple[tuple[str, int], ...]
  tokenizer_dir: str | None
  hf_config: dict[str, Any]

  @property
  def dense_dir(self) -> str:
    return os.path.join(self.folder, DENSE_DIR)

  def experts_dir(self, layer: int) -> str:
    """Folder of MoE layer number `layer` (an index into `moe_layers`)."""
    stack, block = self.moe_layers[layer]
    return os.path.join(self.folder, EXPERTS_DIR, layer_dirname(stack, block))


# --- writer helpers (used by checkpoints_conv) ---------------------------------------------------

def save_tree(path: str | os.PathLike, tree: dict[str, Any]) -> None:
  """Writes a nested dict of numpy arrays as one Orbax PyTree checkpoint at `path` (must not exist).

  Uncompressed: zstd saves ~7% on float weights but halves the save speed and slows every restore
  (measured: 0.13 vs 0.27 GB/s save, 0.38 vs 0.47 GB/s restore, 2 CPU cores). Orbax's default numpy
  handler deep-copies every array before writing (a guard for async saves); this save is
  synchronous, so the copy is skipped.
  """
  import orbax.checkpoint as ocp

  import inspect

  _quiet_orbax()
  kwargs = {}
  if "deepcopy_host_arrays" in inspect.signature(ocp.type_handlers.NumpyHandler).parameters:
    kwargs["deepcopy_host_arrays"] = False  # newer Orbax only (0.12.8 has it, 0.12.0 does not)
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(**kwargs)))
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeSave(tree))


def write_metadata(folder: str | os.PathLike, *, config: SwitchConfig | DecoderConfig, dtype: str,
                   hf_config: dict[str, Any], expert_norms: np.ndarray, has_tokenizer: bool,
                   source: str) -> None:
  """Writes `swapmoe.json`; `expert_norms` is float32[num_moe_layers, E] in `config.moe_layers` order.

  Write it last: it lists the size of every other file in `folder`, which `read_metadata` checks."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
  norms = np.asarray(expert_norms, np.float32)
  if norms.shape != (config.num_moe_layers, config.num_experts):
    raise ValueError(f"expert_norms has shape {norms.shape}, expected "
                     f"{(config.num_moe_layers, config.num_experts)}")
  family = FAMILY_SWITCH if isinstance(config, SwitchConfig) else FAMILY_DECODER
  meta = {
      "format_version": FORMAT_VERSION,
      "family": family,
      "model_type": getattr(config, "model_type", "switch_transformers"),
      "config": config.to_dict(),
      "dtype": dtype,
      "hf_config": hf_config,
      "moe_layers": [[stack, block] for stack, block in config.moe_layers],
      "expert_norms": [[float(x) for x in row] for row in norms],
      "has_tokenizer": bool(has_tokenizer),
      "source": source,
      FILES_KEY: _file_sizes(os.fspath(folder)),
  }
  with open(os.path.join(os.fspath(folder), METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")


# --- reader --------------------------------------------------------------------------------------

def is_converted_checkpoint(folder: str | os.PathLike) -> bool:
  """Whether `folder` looks like a converted checkpoint (has `swapmoe.json`); does not validate it."""
  return os.path.isfile(os.path.join(os.fspath(folder), METADATA_FILE))


def is_complete(folder: str | os.PathLike) -> bool:
  """Whether `folder` holds a converted checkpoint that `read_metadata` accepts: metadata valid, every
  file it lists present at its size (a cache folder filled halfway is not)."""
  if not is_converted_checkpoint(folder):
    return False
  try:
    read_metadata(folder)
  except (CheckpointError, OSError):
    return False
  return True


def read_metadata(folder: str | os.PathLike) -> CheckpointMeta:
  """Reads and validates `swapmoe.json` of a converted folder.

  Raises:
    CheckpointError: one line naming the offending file or folder.
  """
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise CheckpointError(f"no such checkpoint folder: {folder}")
  path = os.path.join(folder, METADATA_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"missing {path}: not a converted swapmoe_jax checkpoint (convert one with python -m checkpoints_conv)")
  meta = read_json_object(path, CheckpointError)

  def field(name, typ):
    if name not in meta:
      raise CheckpointError(f"malformed {path}: no {name!r}")
    value = meta[name]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
      raise CheckpointError(f"malformed {path}: {name!r} should be {typ.__name__}, got {value!r:.80}")
    return value

  version = field("format_version", int)
  if version < 1:
    raise CheckpointError(f"malformed {path}: 'format_version' must be >= 1, got {version}")
  if version > FORMAT_VERSION:
    raise CheckpointError(
        f"{path} was written by a newer swapmoe_jax (format_version {version}, this one reads up to "
        f"{FORMAT_VERSION}); upgrade swapmoe_jax or convert the model again")
  family = meta.get("family", FAMILY_SWITCH)  # written since the decoder families came; Switch before
  if family == FAMILY_SWITCH:
    config_class = SwitchConfig
  elif family == FAMILY_DECODER:
    from swapmoe_jax.models.decoder.config import DecoderConfig

    config_class = DecoderConfig
  else:
    raise CheckpointError(f"unknown family {family!r} in {path}; known: {FAMILY_SWITCH}, {FAMILY_DECODER}")
  try:
    config = config_class.from_dict(field("config", dict))
  except (ConfigError, TypeError) as e:
    raise CheckpointError(f"bad config in {path}: {e}") from e
  model_type = getattr(config, "model_type", "switch_transformers")
  if meta.get("model_type", model_type) != model_type:
    raise CheckpointError(f"malformed {path}: 'model_type' is {meta['model_type']!r}, its config says {model_type!r}")
  dtype = field("dtype", str)
  if dtype not in DTYPES:
    raise CheckpointError(f"unknown dtype {dtype!r} in {path}; known: {', '.join(DTYPES)}")
  try:
    moe_layers = tuple((str(s), int(b)) for s, b in field("moe_layers", list))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"malformed 'moe_layers' in {path}: {e}") from e
  if moe_layers != config.moe_layers:
    raise CheckpointError(f"'moe_layers' in {path} is {list(moe_layers)}, but its config gives "
                          f"{list(config.moe_layers)}")
  try:
    norms = np.asarray(field("expert_norms", list), np.float32)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"malformed 'expert_norms' in {path}: {e}") from e
  want = (config.num_moe_layers, config.num_experts)
  if norms.shape != want and not (norms.size == 0 and want[0] == 0):
    raise CheckpointError(f"'expert_norms' in {path} has shape {norms.shape}, but its config has "
                          f"{want[0]} MoE layers of {want[1]} experts")
  norms = norms.reshape(want)
  if not np.all(np.isfinite(norms)) or np.any(norms < 0):
    raise CheckpointError(f"'expert_norms' in {path} must be finite and >= 0")
  hf_config = meta.get("hf_config") or {}
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"malformed {path}: 'hf_config' should be dict, got {hf_config!r:.80}")
  for sub in (DENSE_DIR, EXPERTS_DIR):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise CheckpointError(f"incomplete checkpoint {folder}: no {sub}/ folder")
  tokenizer_dir = None
  if field("has_tokenizer", bool):
    tokenizer_dir = os.path.join(folder, TOKENIZER_DIR)
    if not os.path.isdir(tokenizer_dir):
      raise CheckpointError(f"{path} says the checkpoint has a tokenizer, but {tokenizer_dir} is missing")
  result = CheckpointMeta(folder=folder, format_version=version, config=config, dtype=dtype,
                          expert_norms=norms, moe_layers=moe_layers, tokenizer_dir=tokenizer_dir,
                          hf_config=hf_config)
  for layer in range(len(moe_layers)):
    if not os.path.isdir(result.experts_dir(layer)):
      raise CheckpointError(f"incomplete checkpoint {folder}: no {result.experts_dir(layer)}")
  _check_files(folder, path, meta.get(FILES_KEY))
  return result


def write_calibration(folder: str | os.PathLike, importance, *, prompts: int, note: str = "") -> str:
  """Stores `importance` float[num_moe_layers, E] (Eq. 1 summed over calibration prompts, in
  `config.moe_layers` order) as `calibration.json` beside the checkpoint in `folder`; written to a
  temporary file and renamed, so a reader never sees half of it. Returns the file's path."""
  folder = os.fspath(folder)
  meta = read_metadata(folder)
  imp = np.asarray(importance, np.float64)
  want = (meta.config.num_moe_layers, meta.config.num_experts)
  if imp.shape != want or not np.all(np.isfinite(imp)) or np.any(imp < 0):
    raise ValueError(f"importance must be finite, non-negative and of shape {want}, got shape {imp.shape}")
  path = os.path.join(folder, CALIBRATION_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"importance": [[float(x) for x in row] for row in imp], "prompts": int(prompts), "note": note}, f)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_calibration(folder: str | os.PathLike, config) -> np.ndarray | None:
  """The importance float64[num_moe_layers, E] stored by `write_calibration`, or None where `folder`
  has none.

  Raises:
    CheckpointError: the file is damaged or does not fit `config` (it names the file).
  """
  path = os.path.join(os.fspath(folder), CALIBRATION_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      imp = np.asarray(json.load(f)["importance"], np.float64)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"damaged {path}: {e}") from None
  want = (config.num_moe_layers, config.num_experts)
  if imp.shape != want or not np.all(np.isfinite(imp)) or np.any(imp < 0):
    raise CheckpointError(f"damaged {path}: importance of shape {imp.shape}, expected finite non-negative "
                          f"values of shape {want}")
  return imp


def write_allocations(folder: str | os.PathLike, policy: str, allocations, *, note: str = "", trace=None) -> str:
  """Adds K per layer for some total slot counts (`allocations`: {total: [K_1..K_L]}, found by
  `allocation.search_allocations` for `policy`) to the stored calibration in `folder`, replacing that
  policy's earlier ones; atomic like `write_calibration`, which drops them all (they were searched with
  the residents of the old importance). `trace` (the search's scores, JSON-able) is kept beside them as
  evidence. Returns the file's path.

  Raises:
    CheckpointError: `folder` has no stored calibration, or it is damaged.
    ValueError: an allocation that is not L values in [1, E] summing to its total.
  """
  folder = os.fspath(folder)
  cfg = read_metadata(folder).config
  if read_calibration(folder, cfg) is None:
    raise CheckpointError(f"{folder} has no stored calibration ({CALIBRATION_FILE}) to add allocations to; "
                          "run calibrate_checkpoint first")
  checked = _checked_allocations({int(t): list(k) for t, k in dict(allocations).items()}, cfg, ValueError, "")
  path = os.path.join(folder, CALIBRATION_FILE)
  with open(path) as f:
    data = json.load(f)
  data.setdefault("allocations", {})[policy] = {str(t): list(k) for t, k in sorted(checked.items())}
  data.setdefault("allocation_notes", {})[policy] = note
  if trace is not None:
    data.setdefault("allocation_traces", {})[policy] = trace
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_allocations(folder: str | os.PathLike, config, policy: str) -> dict[int, tuple[int, ...]]:
  """{total slots: K per layer} stored by `write_allocations` for `policy`; empty where there are none.

  Raises:
    CheckpointError: the file is damaged or an allocation does not fit `config` (it names the file).
  """
  path = os.path.join(os.fspath(folder), CALIBRATION_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      stored = (json.load(f).get("allocations") or {}).get(policy) or {}
    stored = {int(t): [int(k) for k in slots] for t, slots in stored.items()}
  except (OSError, ValueError, AttributeError, TypeError) as e:
    raise CheckpointError(f"damaged {path}: allocations: {e}") from None
  return _checked_allocations(stored, config, CheckpointError, f"damaged {path}: ")


def _checked_allocations(allocations: dict, config, error, prefix: str) -> dict[int, tuple[int, ...]]:
  num_layers, e = config.num_moe_layers, config.num_experts
  for total, slots in allocations.items():
    if len(slots) != num_layers or any(not 1 <= k <= e for k in slots) or sum(slots) != total:
      raise error(f"{prefix}allocation for {total} slots must be {num_layers} K_l in [1, {e}] summing to "
                  f"{total}, got {list(slots)}")
  return {t: tuple(slots) for t, slots in allocations.items()}


def _file_sizes(folder: str) -> dict[str, int]:
  """{path relative to `folder` ('/'-separated): size in bytes} of every file but the metadata."""
  sizes = {}
  for root, _, files in os.walk(folder):
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, folder).replace(os.sep, "/")
      if rel != METADATA_FILE:
        sizes[rel] = os.path.getsize(full)
  return dict(sorted(sizes.items()))


def _check_files(folder: str, path: str, files: Any) -> None:
  """Every file the converter wrote is present with its size: a copy cut short, a cache half filled
  or a file truncated later is named here, before Orbax trips over it. Checkpoints written before
  the list existed have none, and are read as they are."""
  if files is None:
    return
  if not isinstance(files, dict) or not all(
      isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in files.items()):
    raise CheckpointError(f"malformed {path}: {FILES_KEY!r} should map file names to sizes")
  for rel, size in files.items():
    full = os.path.normpath(os.path.join(folder, rel))
    if os.path.isabs(rel) or os.path.commonpath([folder, full]) != folder:
      raise CheckpointError(f"malformed {path}: file {rel!r} is outside the checkpoint folder")
    if not os.path.isfile(full):
      raise CheckpointError(f"incomplete checkpoint {folder}: {rel} is missing")
    if os.path.getsize(full) != size:
      raise CheckpointError(f"incomplete checkpoint {folder}: {rel} has {os.path.getsize(full)} bytes, "
                            f"{METADATA_FILE} says {size}")


def _quiet_orbax() -> None:
  """Orbax logs a warning through absl on every restore of numpy arrays ("No jax.Array in
  TypeHandlerRegistry"): noise for users of the CLI."""
  import logging

  logging.getLogger("absl").setLevel(max(logging.getLogger("absl").level, logging.ERROR))


def _restore(path: str, item: dict | None, restore_args: dict, partial: bool) -> dict:
  import orbax.checkpoint as ocp

  _quiet_orbax()
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=partial))
  except Exception as e:  # Orbax / tensorstore raise many types; name the folder in one line
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"cannot read the Orbax checkpoint {path}: {detail}") from e


def restore_dense(meta: CheckpointMeta) -> dict[str, Any]:
  """Reads the dense tree (see the module docstring) as numpy arrays of dtype `meta.dtype`."""
  import orbax.checkpoint as ocp

  path = meta.dense_dir
  restore_args = _map_leaves(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _tree_metadata(path))
  return _restore(path, None, restore_args, partial=False)


def _tree_metadata(path: str) -> dict:
  """The tree structure an Orbax checkpoint says it holds (no array is read)."""
  import orbax.checkpoint as ocp

  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.metadata(path).item_metadata.tree
  except Exception as e:
    raise CheckpointError(f"cannot read the Orbax checkpoint {path}: {e}") from e


def restore_experts(meta: CheckpointMeta, layer: int,
                    experts: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads some experts of one MoE layer from disk, and only those.

  Args:
    meta: from `read_metadata`.
    layer: MoE layer number, an index into `meta.moe_layers`.
    experts: expert ids in [0, E), in the order wanted (repeats allowed); None: all E in order.

  Returns:
    (wi, wo): wi [n, D, F], wo [n, F, D] (F is 2F for wi of gated experts: `expert_shapes`), dtype
    `meta.dtype`, n = len(experts).
  """
  import orbax.checkpoint as ocp

  cfg = meta.config
  if not 0 <= layer < len(meta.moe_layers):
    raise CheckpointError(f"MoE layer {layer} out of range: {meta.folder} has {len(meta.moe_layers)} MoE layers")
  ids = list(range(cfg.num_experts)) if experts is None else [int(j) for j in experts]
  bad = [j for j in ids if not 0 <= j < cfg.num_experts]
  if bad:
    raise CheckpointError(f"expert ids {bad} out of range: {meta.folder} has {cfg.num_experts} experts per layer")
  dtype = DTYPES[meta.dtype]
  wi_shape, wo_shape = expert_shapes(cfg)
  if not ids:
    return np.zeros((0, *wi_shape), dtype), np.zeros((0, *wo_shape), dtype)
  # Orbax partial restore reads only the keys in `item`; a key missing on disk would silently come
  # back as its placeholder, hence the shape check below.
  wanted = sorted(set(ids))
  item = {expert_key(j): {"wi": np.zeros((), dtype), "wo": np.zeros((), dtype)} for j in wanted}
  args = {expert_key(j): {"wi": ocp.RestoreArgs(restore_type=np.ndarray),
                          "wo": ocp.RestoreArgs(restore_type=np.ndarray)} for j in wanted}
  path = meta.experts_dir(layer)
  tree = _restore(path, item, args, partial=True)
  for j in wanted:
    wi, wo = tree[expert_key(j)]["wi"], tree[expert_key(j)]["wo"]
    if np.shape(wi) == () or np.shape(wo) == ():  # the placeholder came back: not on disk
      raise CheckpointError(f"expert count mismatch: {path} has no expert {j}, but the config in "
                            f"{METADATA_FILE} says num_experts={cfg.num_experts}")
    if np.shape(wi) != wi_shape or np.shape(wo) != wo_shape:
      raise CheckpointError(f"expert {j} in {path} has shapes {np.shape(wi)}, {np.shape(wo)}; "
                            f"expected {wi_shape}, {wo_shape}")
  wi = np.stack([tree[expert_key(j)]["wi"] for j in ids]).astype(dtype, copy=False)
  wo = np.stack([tree[expert_key(j)]["wo"] for j in ids]).astype(dtype, copy=False)
  return wi, wo


def restore_all_experts(meta: CheckpointMeta, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
  """Reads every expert: one (wi [E, D, F], wo [E, F, D]) per MoE layer, in `meta.moe_layers` order."""
  from tqdm.auto import tqdm

  layers = tqdm(range(len(meta.moe_layers)), desc="reading experts", unit="layer", disable=not progress)
  out = []
  for layer in layers:
    on_disk = len(_tree_metadata(meta.experts_dir(layer)))
    if on_disk != meta.config.num_experts:
      raise CheckpointError(f"expert count mismatch: {meta.experts_dir(layer)} holds {on_disk} experts, but the "
                            f"config in {METADATA_FILE} says num_experts={meta.config.num_experts}")
    out.append(restore_experts(meta, layer))
  return out


def _map_leaves(fn, tree):
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)
