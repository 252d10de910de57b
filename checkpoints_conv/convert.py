"""HF folder (or hub id) -> a converted swapmoe_jax checkpoint folder.

config.json's `model_type` picks the family: SwitchTransformers (written here, names mapped by
`rules.RULES`) or a decoder-only MoE, mixtral, qwen2_moe, qwen3_moe or olmoe (`decoder.write`, names
mapped by `decoder_rules.RULES`). The output layout is `swapmoe_jax/checkpoint.py`'s.

Tensors are read one at a time; each MoE layer's experts are written as soon as the layer is complete, so memory
holds the dense weights plus about one layer of experts. Everything is written into a temporary
folder next to the output and renamed into place at the end: an error leaves neither, and a process
killed outright leaves the output absent or complete, never partial. Its temporary folder (named for
the host and process) is removed by the next conversion to the same output once that process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import warnings

import numpy as np

from checkpoints_conv import decoder, decoder_rules, rules
from checkpoints_conv.errors import ConversionError
from checkpoints_conv.sources import WeightReader, resolve_source
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.models.decoder.config import DecoderConfig
from swapmoe_jax.models.switch.config import ConfigError, SwitchConfig, read_json_object

SWITCH_ARCHITECTURE = "SwitchTransformersForConditionalGeneration"


def convert(hf_source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
            progress: bool = True, overwrite: bool = False) -> str:
  """Converts a Hugging Face SwitchTransformers, Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint.

  Args:
    hf_source: a local folder with `config.json` and weights, or a hub id ("google/switch-base-8",
      "mistralai/Mixtral-8x7B-v0.1").
    out_dir: the folder to write; must not exist unless `overwrite`.
    dtype: "float32" or "bfloat16", the dtype of every stored array. Expert norms are computed from
      the source values in float32 whatever this is.
    progress: show a progress bar.
    overwrite: replace an existing converted checkpoint at `out_dir`.

  Returns:
    The absolute path of the written folder.

  Raises:
    ConversionError: one line naming the file or tensor at fault; nothing is left on disk.
  """
  if dtype not in ckpt.DTYPES:
    raise ConversionError(f"unknown dtype {dtype!r}; supported: {', '.join(ckpt.DTYPES)}")
  out = os.path.abspath(os.fspath(out_dir))
  _check_output(out, overwrite)
  src = resolve_source(hf_source)
  if os.path.commonpath([src, out]) in (src, out):
    raise ConversionError(f"the output folder {out} and the source folder {src} must not contain each other")
  hf_config, cfg = _read_config(src)
  reader = WeightReader(src)
  parent = os.path.dirname(out)
  created = _topmost_missing(parent)
  os.makedirs(parent, exist_ok=True)
  _remove_stale(out)
  tmp = tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the folder through the rename
    if isinstance(cfg, SwitchConfig):
      norms = _write(tmp, reader, cfg, dtype, progress)
    else:
      dense, norms = decoder.write(tmp, reader, cfg, dtype, progress)
      ckpt.save_tree(os.path.join(tmp, ckpt.DENSE_DIR), _nest(dense))
    tokenizer = _copy_extras(src, tmp)
    ckpt.write_metadata(tmp, config=cfg, dtype=dtype, hf_config=hf_config, expert_norms=norms,
                        has_tokenizer=tokenizer, source=_describe(hf_source, src))
    _install(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_empty(parent, created)
    raise
  return out


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_prefix(out: str, kind: str) -> str:
  """`<name>.tmp-<host>-<pid>-`: the name says which process owns a temporary folder."""
  return f"{os.path.basename(out)}.{kind}-{_host()}-{os.getpid()}-"


def _remove_stale(out: str) -> None:
  """Removes the temporary folders next to `out` left by conversions killed before they could clean
  up (SIGKILL, out of memory): those of processes of this host that no longer run."""
  parent, name = os.path.split(out)
  owned = re.compile(re.escape(name) + r"\.(?:tmp|old)-" + re.escape(_host()) + r"-(\d+)-")
  for entry in os.listdir(parent):
    m = owned.match(entry)
    if m and not _running(int(m.group(1))):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def _describe(hf_source: str | os.PathLike, src: str) -> str:
  """The source as recorded in swapmoe.json: a local folder's absolute path, else the hub id."""
  return src if os.path.isdir(os.fspath(hf_source)) else os.fspath(hf_source)


def _topmost_missing(folder: str) -> str | None:
  """The topmost ancestor-or-self of `folder` that does not exist yet (what `makedirs` will create)."""
  missing = None
  while not os.path.exists(folder):
    missing, folder = folder, os.path.dirname(folder)
  return missing


def _remove_empty(folder: str, created: str | None) -> None:
  """Removes `folder` and its ancestors up to `created`, those this run made, while they are empty."""
  if created is None:
    return
  while True:
    try:
      os.rmdir(folder)
    except OSError:
      return
    if folder == created:
      return
    folder = os.path.dirname(folder)


def _check_output(out: str, overwrite: bool) -> None:
  if not os.path.lexists(out):
    return
  if not overwrite:
    raise ConversionError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
  if not os.path.isdir(out) or os.path.islink(out):
    raise ConversionError(f"refusing to replace {out}: it is not a folder")
  if os.listdir(out) and not ckpt.is_converted_checkpoint(out):
    raise ConversionError(f"refusing to replace {out}: it is not a converted checkpoint (no {ckpt.METADATA_FILE})")


def _read_config(src: str) -> tuple[dict, SwitchConfig | DecoderConfig]:
  """config.json and this project's config of it, by `model_type`."""
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"missing {path}: a Hugging Face model folder has config.json next to the weights")
  hf_config = read_json_object(path, ConversionError)
  model_type, archs = hf_config.get("model_type"), hf_config.get("architectures") or []
  supported = {"switch_transformers": SWITCH_ARCHITECTURE} | decoder_rules.ARCHITECTURES
  if model_type not in supported:
    listed = ", ".join(f"{arch} (model_type {mt})" for mt, arch in supported.items())
    raise ConversionError(f"{path}: unsupported model_type {model_type!r} (architectures {archs}); "
                          f"supported: {listed}")
  if model_type != "switch_transformers" and archs and supported[model_type] not in archs:
    # Other heads (ForSequenceClassification, ...) have other tensors; only the causal LM is served.
    raise ConversionError(f"{path}: unsupported architecture {archs} for model_type {model_type!r}; "
                          f"supported: {supported[model_type]}")
  try:
    if model_type == "switch_transformers":
      return hf_config, SwitchConfig.from_hf_dict(hf_config)
    return hf_config, DecoderConfig.from_hf_dict(hf_config)
  except ConfigError as e:
    raise ConversionError(f"{path}: {e}") from e


def _write(tmp: str, reader: WeightReader, cfg: SwitchConfig, dtype: str, progress: bool) -> np.ndarray:
  """Streams every tensor into `tmp`: experts layer by layer, then the dense tree.

  Returns:
    The expert norms ‖E_i‖ = sqrt(‖wi‖_F² + ‖wo‖_F²), float32[num_moe_layers, E], summed in float64
    from the float32 source values.
  """
  from tqdm.auto import tqdm

  out_dtype = ckpt.DTYPES[dtype]
  E = cfg.num_experts
  layer_of = {layer: n for n, layer in enumerate(cfg.moe_layers)}
  sumsq = np.zeros((cfg.num_moe_layers, E), np.float64)
  dense: dict[str, np.ndarray] = {}
  pending: dict[tuple[str, int], dict[str, dict[str, np.ndarray]]] = {}
  tied: dict[str, np.ndarray] = {}
  shared32 = None
  seen: dict[str, str] = {}
  os.makedirs(os.path.join(tmp, ckpt.EXPERTS_DIR))
  bar = tqdm(reader, total=reader.count, desc="converting", unit="tensor", disable=not progress)
  for t in bar:
    if t.name in seen:
      raise ConversionError(f"tensor {t.name} appears twice: in {seen[t.name]} and {t.file}")
    seen[t.name] = t.file
    try:
      m = rules.match(t.name, cfg)
    except rules.Unexpected as e:
      raise ConversionError(f"unexpected tensor {t.name} in {t.file}: {e}") from None
    if m is None:
      raise ConversionError(f"unknown tensor {t.name} in {t.file}: not a SwitchTransformers weight")
    want = m.rule.shape(cfg)
    if t.shape != want:
      if ".router.classifier." in t.name and t.shape[:1] != want[:1]:
        raise ConversionError(f"expert count mismatch: {t.name} in {t.file} routes to {t.shape[0]} experts, "
                              f"config.json says num_experts={E}")
      raise ConversionError(f"shape mismatch for {t.name} in {t.file}: the file has {list(t.shape)}, "
                            f"config.json implies {list(want)}")
    x = t.load()
    if m.rule.kind == rules.TIED:
      tied[t.name] = x
      continue
    if m.dest == "shared":
      shared32 = x
    y = np.ascontiguousarray(x.T if m.rule.transpose else x, dtype=out_dtype)
    if m.rule.kind == rules.DENSE:
      dense[m.dest] = y
      continue
    layer = (m.binding["stack"], int(m.binding["i"]))
    j = int(m.binding["j"])
    flat = x.ravel().astype(np.float64)
    sumsq[layer_of[layer], j] += float(flat @ flat)
    experts = pending.setdefault(layer, {})
    experts.setdefault(ckpt.expert_key(j), {})[m.dest] = y
    if sum(len(e) for e in experts.values()) == 2 * E:
      bar.set_postfix_str(f"writing {ckpt.layer_dirname(*layer)}")
      ckpt.save_tree(os.path.join(tmp, ckpt.EXPERTS_DIR, ckpt.layer_dirname(*layer)), experts)
      del pending[layer]
  bar.close()
  _check_complete(seen, pending, cfg, reader.folder)
  _check_tied(tied, shared32, cfg)
  ckpt.save_tree(os.path.join(tmp, ckpt.DENSE_DIR), _nest(dense))
  return np.sqrt(sumsq).astype(np.float32)


def _check_complete(seen: dict[str, str], pending: dict, cfg: SwitchConfig, folder: str) -> None:
  for (stack, i), experts in pending.items():
    have = sorted(int(k[1:]) for k in experts)
    if have == list(range(len(have))):
      raise ConversionError(f"expert count mismatch: config.json says num_experts={cfg.num_experts}, but the "
                            f"weights in {folder} have {len(have)} experts in {stack} block {i}")
  missing = sorted(rules.required_names(cfg) - set(seen))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"missing tensor {missing[0]}{more} in {folder}")


def _check_tied(tied: dict[str, np.ndarray], shared32: np.ndarray | None, cfg: SwitchConfig) -> None:
  for name, x in sorted(tied.items()):
    if np.array_equal(x, shared32):
      continue
    if cfg.tie_word_embeddings:
      # transformers ties these to shared.weight on load, whatever the file holds.
      warnings.warn(f"{name} differs from shared.weight; ignored, as transformers does with "
                    f"tie_word_embeddings=true", stacklevel=3)
    else:
      raise ConversionError(f"{name} differs from shared.weight: separate input embeddings per stack "
                            f"(tie_word_embeddings=false) are not supported")


def _nest(flat: dict[str, np.ndarray]) -> dict:
  """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
  tree: dict = {}
  for path, x in sorted(flat.items()):
    *parents, leaf = path.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


def _copy_extras(src: str, tmp: str) -> bool:
  """Copies tokenizer files into tokenizer/ and generation_config.json; whether a vocabulary came along."""
  present = [f for f in ckpt.TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  has_tokenizer = any(f in ckpt.TOKENIZER_VOCAB_FILES for f in present)
  if has_tokenizer:
    os.makedirs(os.path.join(tmp, ckpt.TOKENIZER_DIR))
    for f in present:
      shutil.copyfile(os.path.join(src, f), os.path.join(tmp, ckpt.TOKENIZER_DIR, f))
  gen = os.path.join(src, ckpt.GENERATION_CONFIG_FILE)
  if os.path.isfile(gen):
    shutil.copyfile(gen, os.path.join(tmp, ckpt.GENERATION_CONFIG_FILE))
  return has_tokenizer


def _install(tmp: str, out: str) -> None:
  """Renames `tmp` to `out`, replacing an existing `out` (already vetted by `_check_output`)."""
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  old = tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=os.path.dirname(out))
  os.rmdir(old)
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)
