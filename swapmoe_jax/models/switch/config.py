"""Model configuration: a frozen dataclass that `jax.jit` can treat as static.

Axis letters used across the package (shape comments and einsum strings):
  B batch, T target (decoder) length, S source (encoder) length, D model width,
  F expert / FFN width, E experts, K resident slots, L layers, H heads, V vocab, C head dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_ARCHITECTURES = ("SwitchTransformersForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("switch_transformers",)
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


class ConfigError(ValueError):
  """A configuration this package cannot run."""


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """Shape and semantics of a Switch Transformer encoder-decoder (HF `SwitchTransformersConfig`)."""

  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 12
  num_layers: int = 12
  num_decoder_layers: int = 12
  num_experts: int = 8
  expert_capacity: int = 64
  encoder_sparse_step: int = 2
  decoder_sparse_step: int = 2
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "relu"
  router_bias: bool = False
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_ids: tuple[int, ...] = (1,)
  decoder_start_token_id: int = 0

  is_encoder_decoder = True  # (a class constant, not a field) decoder-only families say False

  def __post_init__(self):
    # Checked field by field, so that a damaged swapmoe.json ("d_model": "768", true, 1.5) is refused
    # by name here instead of failing somewhere inside a jitted function.
    for f in dataclasses.fields(self):
      _check_type(f.name, getattr(self, f.name), f.type)
    if self.dense_act_fn not in SUPPORTED_ACTIVATIONS:
      raise ConfigError(
          f"dense_act_fn={self.dense_act_fn!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
      )
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
                 "num_experts", "expert_capacity", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
    if not 0 < self.layer_norm_epsilon < 1:
      raise ConfigError(f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
    for name in ("pad_token_id", "decoder_start_token_id"):  # looked up in the embedding
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise ConfigError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")

  # --- derived -----------------------------------------------------------------------------
  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @staticmethod
  def _sparse_layers(num_layers: int, step: int) -> tuple[int, ...]:
    # HF SwitchTransformersStack: sparse if `i % step == 1 or step == 1` (step > 0).
    if step <= 0:
      return ()
    return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)

  @property
  def encoder_sparse_layers(self) -> tuple[int, ...]:
    return self._sparse_layers(self.num_layers, self.encoder_sparse_step)

  @property
  def decoder_sparse_layers(self) -> tuple[int, ...]:
    return self._sparse_layers(self.num_decoder_layers, self.decoder_sparse_step)

  @property
  def moe_layers(self) -> tuple[tuple[str, int], ...]:
    """Every MoE layer as (stack, block index), encoder first: the order of all per-layer arrays."""
    return tuple(("encoder", i) for i in self.encoder_sparse_layers) + tuple(
        ("decoder", i) for i in self.decoder_sparse_layers
    )

  @property
  def num_moe_layers(self) -> int:
    return len(self.moe_layers)

  def expert_param_count(self) -> int:
    """Parameters of one expert (wi + wo)."""
    return 2 * self.d_model * self.d_ff

  # --- (de)serialisation ---------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SwitchConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ConfigError(f"unknown config fields: {sorted(unknown)}")
    d = dict(d)
    if isinstance(d.get("eos_token_ids"), list):
      d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return cls(**d)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "SwitchConfig":
    """Builds the config from a Hugging Face `config.json` dict, mirroring `SwitchTransformersConfig`."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"unsupported model_type {model_type!r} (architectures {archs}); supported: "
          f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
      )
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
      raise ConfigError(
          f"unsupported architecture {archs}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
      )
    get = lambda k, default: hf[k] if hf.get(k) is not None else default  # noqa: E731
    num_layers = int(get("num_layers", 12))
    num_decoder_layers = int(get("num_decoder_layers", num_layers))
    n_sparse_enc = int(get("num_sparse_encoder_layers", 3))
    n_sparse_dec = int(get("num_sparse_decoder_layers", 3))
    # Same arithmetic as SwitchTransformersConfig.__post_init__.
    enc_step = num_layers // n_sparse_enc if n_sparse_enc > 0 else num_layers
    dec_step = num_decoder_layers // n_sparse_dec if n_sparse_dec > 0 else num_decoder_layers
    eos = get("eos_token_id", 1)
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = int(get("pad_token_id", 0))
    act = get("dense_act_fn", "relu")
    if get("router_dtype", "float32") != "float32":
      raise ConfigError(f"router_dtype={hf.get('router_dtype')!r} is not supported; supported: float32")
    try:
      return cls(
          vocab_size=int(get("vocab_size", 32128)),
          d_model=int(get("d_model", 768)),
          d_kv=int(get("d_kv", 64)),
          d_ff=int(get("d_ff", 2048)),
          num_heads=int(get("num_heads", 12)),
          num_layers=num_layers,
          num_decoder_layers=num_decoder_layers,
          num_experts=int(get("num_experts", 8)),
          expert_capacity=int(get("expert_capacity", 64)),
          encoder_sparse_step=enc_step,
          decoder_sparse_step=dec_step,
          relative_attention_num_buckets=int(get("relative_attention_num_buckets", 32)),
          relative_attention_max_distance=int(get("relative_attention_max_distance", 128)),
          layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-6)),
          dense_act_fn=act,
          router_bias=bool(get("router_bias", False)),
          tie_word_embeddings=bool(get("tie_word_embeddings", True)),
          pad_token_id=pad,
          eos_token_ids=eos_ids,
          decoder_start_token_id=int(get("decoder_start_token_id", pad)),
      )
    except (TypeError, ValueError) as e:
      if isinstance(e, ConfigError):
        raise
      raise ConfigError(f"malformed config: {e}") from e


def _check_type(name: str, value: Any, annotation: str) -> None:
  """Raises ConfigError unless `value` fits the field's annotation ("int", "float", "bool", "str",
  "tuple[int, ...]"); bools are not ints here, ints are accepted as floats."""
  import numbers

  def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

  ok = {
      "int": is_int,
      "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
      "bool": lambda v: isinstance(v, bool),
      "str": lambda v: isinstance(v, str),
      "tuple[int, ...]": lambda v: isinstance(v, tuple) and len(v) > 0 and all(is_int(t) for t in v),
  }[annotation](value)
  if not ok:
    what = "a non-empty list of integers" if annotation.startswith("tuple") else f"of type {annotation}"
    raise ConfigError(f"config field {name} must be {what}, got {value!r:.60}")


def read_json_object(path: str, error: type[Exception]) -> dict[str, Any]:
  """The JSON object in `path`; a file that cannot be read or parsed, or holds something else, raises
  `error` with one line naming the file."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"cannot parse {path}: {e}") from e
  if not isinstance(obj, dict):
    raise error(f"malformed {path}: expected a JSON object")
  return obj
