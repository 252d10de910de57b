"""Where HF weights come from: a local folder or a hub id, read lazily one file at a time.

Formats, in the order Hugging Face prefers them: `model.safetensors`, sharded safetensors
(`model.safetensors.index.json` + shards), `pytorch_model.bin`, sharded `.bin`
(`pytorch_model.bin.index.json` + shards). Safetensors files are parsed here and memory-mapped
(numpy cannot name bfloat16, so the `safetensors` package's numpy reader cannot read bf16 files);
`.bin` files are read with `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from checkpoints_conv.errors import ConversionError
from swapmoe_jax.checkpoint import GENERATION_CONFIG_FILE, TOKENIZER_FILES

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z")
_META_FILES = ["config.json", GENERATION_CONFIG_FILE, *TOKENIZER_FILES]
_HUB_WEIGHT_PATTERNS = (
    [SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors"],
    [TORCH_BIN, TORCH_BIN_INDEX, "pytorch_model-*.bin"],
)


def resolve_source(name_or_folder: str | os.PathLike, revision: str | None = None) -> str:
  """A local folder as is; otherwise a hub id, downloaded with `huggingface_hub.snapshot_download`.

  Only config, tokenizer and one weight format (safetensors when the repository has it) are fetched.

  Raises:
    ConversionError: no such folder, or the hub cannot be reached (pass a local folder then).
  """
  name = os.fspath(name_or_folder)
  if os.path.isdir(name):
    return os.path.abspath(name)
  if os.path.exists(name):
    raise ConversionError(f"{name} is a file; pass the folder holding config.json and the weights")
  if os.path.isabs(name) or name.startswith((".", "~")) or not _HUB_ID.match(name):
    raise ConversionError(f"no such folder: {name}")
  try:
    import huggingface_hub
  except ImportError:
    raise ConversionError(
        f"no folder {name}, and huggingface_hub is not installed to fetch it from the hub") from None
  folder = None
  for weights in _HUB_WEIGHT_PATTERNS:
    try:
      folder = huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=_META_FILES + weights)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises httpx, OSError and its own types
      kind = type(e).__name__
      if kind in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
        raise ConversionError(f"no folder {name}, and the Hugging Face hub has no accessible model {name!r} "
                              f"({kind})") from e
      raise ConversionError(f"no folder {name}, and the Hugging Face hub is unreachable ({kind}); "
                            f"download the model elsewhere and pass its local folder") from e
    if _find_weights(folder):
      break
  return folder


def _find_weights(folder: str) -> str | None:
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One source tensor, not read yet."""

  name: str
  file: str
  shape: tuple[int, ...]
  load: Callable[[], np.ndarray]  # -> float32 array of `shape`


class WeightReader:
  """The tensors of one HF folder, in file order; reading holds one file open at a time.

  Construction checks what can be checked cheaply: that weights exist, that every shard named by an
  index exists, and (for safetensors) that every header is sound and every shard is long enough.
  """

  def __init__(self, folder: str):
    self.folder = folder
    first = _find_weights(folder)
    if first is None:
      raise ConversionError(f"no weights found in {folder}: looked for {', '.join(WEIGHT_FILES)}")
    self.safetensors = first.endswith((".safetensors", SAFETENSORS_INDEX))
    if first.endswith(".json"):
      self.plan = _read_index(first)
    else:
      self.plan = [(first, None)]
    if self.safetensors:
      self._files = {f: _SafetensorsFile(f) for f, _ in self.plan}
      for file, names in self.plan:
        absent = [n for n in names or () if n not in self._files[file].header]
        if absent:
          raise ConversionError(f"tensor {absent[0]} is listed in {first} for {file}, but that file does "
                                f"not hold it")
    else:
      _import_torch(first)

  @property
  def count(self) -> int | None:
    """Number of tensors, or None when only reading the files would tell (an unindexed .bin)."""
    if self.safetensors:
      return sum(len(names if names is not None else self._files[f].header) for f, names in self.plan)
    if all(names is not None for _, names in self.plan):
      return sum(len(names) for _, names in self.plan)
    return None

  def __iter__(self) -> Iterator[Tensor]:
    for file, names in self.plan:
      if self.safetensors:
        yield from self._files[file].tensors(names)
      else:
        yield from _torch_tensors(file, names)


def _read_index(path: str) -> list[tuple[str, list[str]]]:
  """(shard path, tensor names) for each shard named by a HF `*.index.json`, in shard order."""
  try:
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"malformed index {path}: {type(e).__name__}: {e}") from e
  shards: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(str(shard), []).append(name)
  plan = []
  for shard in sorted(shards):
    file = os.path.join(os.path.dirname(path), shard)
    if not os.path.isfile(file):
      raise ConversionError(f"missing shard {file} (named in {path})")
    plan.append((file, shards[shard]))
  return plan


# --- safetensors -----------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class _SafetensorsFile:
  """A parsed safetensors file: header {name: (dtype, shape, start, end)} over a lazy memory map.

  Format: u64 little-endian header size N, N bytes of JSON, then the data; offsets are relative to
  the data start (https://github.com/huggingface/safetensors#format).
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    try:
      with open(path, "rb") as f:
        if size < 8:
          raise ValueError(f"{size} bytes, shorter than the 8-byte header size")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 << 20:
          raise ValueError(f"header size {n} beyond the file's {size} bytes")
        header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
      header.pop("__metadata__", None)
      self.data_start, data_size = 8 + n, size - 8 - n
      self.header = {}
      covered = 0
      for name, entry in header.items():
        dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        if dtype not in _ST_DTYPES:
          raise ValueError(f"tensor {name} has dtype {dtype}; supported: {', '.join(_ST_DTYPES)}")
        nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - start != nbytes or start < 0:
          raise ValueError(f"tensor {name}: offsets {start}..{end} do not fit shape {list(shape)} {dtype}")
        if end > data_size:
          raise ValueError(f"tensor {name} ends at byte {end} of the data, which has {data_size}")
        covered += nbytes
        self.header[name] = (dtype, shape, start, end)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
      raise ConversionError(f"truncated or corrupt safetensors file {path}: {e}") from e
    if covered != data_size:
      raise ConversionError(f"truncated or corrupt safetensors file {path}: its tensors cover {covered} "
                            f"of its {data_size} data bytes")

  def tensors(self, names: list[str] | None) -> Iterator[Tensor]:
    data = np.memmap(self.path, dtype=np.uint8, mode="r") if self.header else None
    for name in names if names is not None else self.header:
      dtype, shape, start, end = self.header[name]

      def load(start=start, end=end, dtype=dtype, shape=shape):
        raw = data[self.data_start + start:self.data_start + end]
        return raw.view(np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")).reshape(shape).astype(np.float32)

      yield Tensor(name, self.path, shape, load)


# --- torch .bin ----------------------------------------------------------------------------------

def _import_torch(path: str):
  try:
    import torch
  except ImportError:
    raise ConversionError(
        f"reading {path} needs PyTorch (pip install torch), or a source in safetensors") from None
  return torch


def _torch_tensors(path: str, names: list[str] | None) -> Iterator[Tensor]:
  torch = _import_torch(path)
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):  # files in torch's legacy (pre-zip) format cannot be mapped
        raise
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean an unreadable file
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConversionError(f"cannot read {path} ({type(e).__name__}: {first[:200]})") from e
  if not isinstance(state, dict):
    raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
  if names is not None:
    absent = [n for n in names if n not in state]
    if absent:
      raise ConversionError(f"tensor {absent[0]} is listed in {TORCH_BIN_INDEX} for {path}, but that file "
                            f"does not hold it")
  for name in names if names is not None else list(state):
    t = state[name]
    if not isinstance(t, torch.Tensor):
      raise ConversionError(f"{name} in {path} is a {type(t).__name__}, not a tensor")
    yield Tensor(name, path, tuple(t.shape), lambda t=t: t.detach().to(torch.float32).numpy())
