"""Configuration of the decoder-only MoE families: one frozen dataclass that `jax.jit` can treat as static.

Each family (`models/mixtral`, `models/qwen2_moe`, `models/qwen3_moe`, `models/olmoe`) reads its Hugging
Face `config.json` into a `DecoderConfig`; `DecoderConfig.from_hf_dict` dispatches on `model_type`.

Axis letters (shape comments): B batch, T positions, D model width, F expert / FFN width, E experts,
L cache positions, H query heads, G kv heads, C head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Any

from swapmoe_jax.models.switch.config import SUPPORTED_ACTIVATIONS, ConfigError

# model_type -> the family package whose `config.config_from_hf` reads it.
FAMILIES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
QK_NORMS = (None, "head", "full")
# Keys each rope type needs in `rope_scaling` (HF `modeling_rope_utils`); the rest are optional.
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}

__all__ = ["ConfigError", "DecoderConfig", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES"]


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_tuple(v) -> bool:
  return isinstance(v, tuple) and all(_is_int(t) for t in v)


# field annotation -> (check, what it must be)
_CHECKS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer or null"),
    "float": (_is_float, "a number"),
    "float | None": (lambda v: v is None or _is_float(v), "a number or null"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "tuple[int, ...]": (_int_tuple, "a list of integers"),
    "tuple | None": (lambda v: v is None or isinstance(v, tuple), "an object or null"),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and semantics of a decoder-only MoE transformer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

  `rope_scaling` is given as a dict (HF's `rope_parameters` without `rope_theta`; None for plain RoPE)
  and kept as a sorted tuple of (key, value) pairs so that the config stays hashable (jit-static);
  `rope_params` reads it back as a dict.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  moe_d_ff: int
  sparse_layers: tuple[int, ...]
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  max_position_embeddings: int = 4096
  norm_topk_prob: bool = False
  shared_d_ff: int | None = None
  dense_d_ff: int | None = None
  qk_norm: str | None = None
  attention_bias: bool = False  # q/k/v bias
  output_bias: bool = False  # o bias (Qwen3-MoE and OLMoE with attention_bias)
  clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()  # blocks that use the window (all when a window applies to all)
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    for name in ("sparse_layers", "sliding_layers", "eos_token_ids"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    for f in dataclasses.fields(self):
      check, what = _CHECKS[f.type]
      if not check(getattr(self, f.name)):
        raise ConfigError(f"config field {f.name} must be {what}, got {getattr(self, f.name)!r:.60}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(f"model_type {self.model_type!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                 "top_k", "moe_d_ff", "max_position_embeddings"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("shared_d_ff", "dense_d_ff", "sliding_window"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ConfigError(f"{name} must be positive or null, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.top_k > self.num_experts:
      raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if not 0 < self.rms_norm_eps < 1:
      raise ConfigError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
    if self.rope_theta <= 0:
      raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
    if self.qk_norm not in QK_NORMS:
      raise ConfigError(f"qk_norm={self.qk_norm!r} is not supported; supported: None, 'head' (Qwen3), 'full' (OLMoE)")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    for name in ("sparse_layers", "sliding_layers"):
      layers = getattr(self, name)
      if any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"{name} must be distinct block indices in [0, {self.num_layers}), got {list(layers)}")
    if self.sliding_layers and self.sliding_window is None:
      raise ConfigError("sliding_layers are set but sliding_window is null")
    if set(range(self.num_layers)) - set(self.sparse_layers) and self.dense_d_ff is None:
      raise ConfigError("dense blocks (not in sparse_layers) need dense_d_ff")
    if self.clip_qkv is not None and self.clip_qkv <= 0:
      raise ConfigError(f"clip_qkv must be positive or null, got {self.clip_qkv}")
    if not 0 <= self.pad_token_id < self.vocab_size:  # looked up in the embedding
      raise ConfigError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")
    self._check_rope()

  def _check_rope(self) -> None:
    params = self.rope_params
    if params is None:
      return
    kind = params.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if params.get(k) is None]
    if missing:
      raise ConfigError(f"rope type {kind!r} needs {', '.join(missing)} in rope_scaling")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError("partial_rotary_factor != 1 is not supported")

  # --- derived (the names the runtime shares with SwitchConfig) --------------------------------
  is_encoder_decoder = False

  @property
  def d_model(self) -> int:
    return self.hidden_size

  @property
  def rope_params(self) -> dict[str, Any] | None:
    """`rope_scaling` as a dict (rope_type and its parameters), or None for plain RoPE."""
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def decoder_sparse_layers(self) -> tuple[int, ...]:
    return tuple(sorted(self.sparse_layers))

  @property
  def encoder_sparse_layers(self) -> tuple[int, ...]:
    return ()

  @property
  def moe_layers(self) -> tuple[tuple[str, int], ...]:
    """Every MoE layer as ("decoder", block index): the order of all per-layer arrays."""
    return tuple(("decoder", i) for i in self.decoder_sparse_layers)

  @property
  def num_moe_layers(self) -> int:
    return len(self.sparse_layers)

  def window_of(self, block: int) -> int | None:
    """The sliding window of block `block`, or None for full attention."""
    return self.sliding_window if block in self.sliding_layers else None

  def expert_param_count(self) -> int:
    """Parameters of one gated expert: wi [2F, D] (gate; up) + wo [D, F]."""
    return 3 * self.hidden_size * self.moe_d_ff

  # --- budget hooks ------------------------------------------------------------------------------
  def router_param_count(self) -> int:
    """Router weights [D, E] of all MoE layers (held in float32)."""
    return self.num_moe_layers * self.hidden_size * self.num_experts

  def dense_param_count(self) -> int:
    """Parameters that are always resident: everything but the routed experts (routers included).

    embed [V, D], lm_head [D, V] unless tied, final_norm [D]; per block attn_norm, ffn_norm [D], q [D, H*C],
    k, v [D, G*C], o [H*C, D], optional biases and q/k norms; then either a router [D, E] (+ a shared
    expert [D, 2Fs] + [Fs, D] + its gate [D, 1]) or a dense SwiGLU MLP [D, 2F] + [F, D].
    """
    d, hc, gc = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    total = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
    attn = 2 * d * hc + 2 * d * gc
    attn += (hc + 2 * gc) if self.attention_bias else 0
    attn += d if self.output_bias else 0
    attn += {None: 0, "head": 2 * self.head_dim, "full": hc + gc}[self.qk_norm]
    for i in range(self.num_layers):
      total += 2 * d + attn
      if i in self.sparse_layers:
        total += d * self.num_experts
        if self.shared_d_ff:
          total += 3 * d * self.shared_d_ff + d
      else:
        total += 3 * d * self.dense_d_ff
    return total

  def kv_cache_elements(self, batch: int, src_len: int, tgt_len: int) -> int:
    """K and V per block, [B, G, src_len + tgt_len, C]."""
    return self.num_layers * 2 * batch * self.num_kv_heads * (src_len + tgt_len) * self.head_dim

  def workspace_elements(self, batch: int, src_len: int, tgt_len: int) -> int:
    """An estimate of the activation elements at the peak of a generate call: the larger of the prefill
    (B*S tokens) and one decode step (B tokens over S+T cache positions).

    Per token: residual, normed input, attention and FFN outputs [D] x4; q, k, v [H*C + 2*G*C]; RoPE
    cos/sin [2C]; router logits and probabilities [E] x2; the chosen experts' intermediates and outputs
    (k x ([2F] + [F] + [D])); the shared expert or dense MLP intermediate ([3Fs] or [3F]). Per row: attention
    scores and probabilities [H, Q, keys] x2 (GQA repeats no K/V: grouped einsums); the last position's
    logits and log-probabilities [V] x2 (float32). The prefill also holds the MoE dispatch buffers of
    `moe/experts.py` (capacity=None: C = N = B*S tokens per slot): tokens [K, N, D], intermediates
    [K, N, 2F] + [K, N, F], outputs [K, N, D], counted with K = E, plus the [N*k, E] one-hot ranks.
    """
    d, e, k, f = self.hidden_size, self.num_experts, self.top_k, self.moe_d_ff
    hc, gc = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    ffn = k * (3 * f + d) + 3 * max(self.shared_d_ff or 0, self.dense_d_ff or 0)
    per_token = 4 * d + hc + 2 * gc + 2 * self.head_dim + 2 * e + ffn
    n = batch * src_len
    prefill = n * per_token + 2 * batch * self.num_heads * src_len * src_len + e * n * (2 * d + 3 * f) + n * k * e
    decode = batch * per_token + 2 * batch * self.num_heads * (src_len + tgt_len)
    return max(prefill, decode) + 2 * batch * self.vocab_size

  # --- (de)serialisation -------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in ("sparse_layers", "sliding_layers", "eos_token_ids"):
      d[name] = list(d[name])
    d["rope_scaling"] = self.rope_params
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ConfigError(f"unknown config fields: {sorted(unknown)}")
    d = dict(d)
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
      raise ConfigError(f"config field rope_scaling must be an object or null, got {d['rope_scaling']!r:.60}")
    try:
      return cls(**d)
    except TypeError as e:  # a required field missing
      raise ConfigError(f"malformed config: {e}") from e

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "DecoderConfig":
    """Builds the config from a Hugging Face `config.json` dict, by its `model_type`."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
      raise ConfigError(f"unsupported model_type {model_type!r} (architectures {hf.get('architectures') or []}); "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = importlib.import_module(f"swapmoe_jax.models.{FAMILIES[model_type]}.config")
    try:
      return family.config_from_hf(hf)
    except ConfigError:
      raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"malformed {model_type} config: {e!r}") from e


# --- shared reading of HF config.json fields (used by the family packages) -------------------------


def hf_get(hf: dict[str, Any], key: str, default):
  """hf[key], or `default` where it is absent or null."""
  return hf[key] if hf.get(key) is not None else default


def hf_rope(hf: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older top-level `rope_theta`
  and `rope_scaling` (with "type" or "rope_type"), as HF's `standardize_rope_params` reads them."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, dict):
    raise ConfigError(f"rope parameters must be an object, got {params!r:.60}")
  if params and all(isinstance(v, dict) for v in params.values()):
    raise ConfigError("per-layer-type rope parameters are not supported; supported: one rope for all blocks")
  params = dict(params)
  theta = float(params.pop("rope_theta", None) or hf_get(hf, "rope_theta", default_theta))
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  if kind not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  if kind == "default":
    if params.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError("partial_rotary_factor != 1 is not supported")
    return theta, None
  if kind in ("llama3", "yarn"):
    # HF: `original_max_position_embeddings` defaults to max_position_embeddings.
    params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings")
                      or hf_get(hf, "max_position_embeddings", 4096))
  return theta, {"rope_type": kind, **params}


def hf_tokens(hf: dict[str, Any], bos: int | None, eos: int | list | None, pad: int | None) -> dict[str, Any]:
  """bos_token_id, eos_token_ids (tuple) and pad_token_id (falling back to eos[0], then 0)."""
  eos = hf_get(hf, "eos_token_id", eos)
  eos_ids = () if eos is None else tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))
  pad = hf_get(hf, "pad_token_id", pad)
  if pad is None:
    pad = eos_ids[0] if eos_ids else 0
  bos = hf_get(hf, "bos_token_id", bos)
  return dict(bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids, pad_token_id=int(pad))


def hf_num_experts(hf: dict[str, Any], default: int) -> int:
  """E under either name: transformers 5 saves Mixtral's and Qwen3-MoE's as `num_local_experts` (their
  `attribute_map`), hub configs of Qwen and OLMoE as `num_experts`."""
  return int(hf_get(hf, "num_experts", hf_get(hf, "num_local_experts", default)))


def hf_head_dim(hf: dict[str, Any]) -> int:
  """HF: `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`."""
  return int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))


def qwen_sparse_layers(hf: dict[str, Any], num_layers: int, num_experts: int) -> tuple[int, ...]:
  """Qwen2/3-MoE: block i is sparse unless in `mlp_only_layers`, when num_experts > 0 and
  (i + 1) % decoder_sparse_step == 0 (`Qwen2MoeDecoderLayer.__init__`)."""
  step = int(hf_get(hf, "decoder_sparse_step", 1))
  mlp_only = set(hf_get(hf, "mlp_only_layers", []))
  if num_experts <= 0 or step <= 0:
    return ()
  return tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
