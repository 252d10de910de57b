"""HF SwitchTransformers tensor names -> this project's checkpoint layout: one table of rules.

Each rule names an HF tensor by a template ("{stack}.block.{i}.layer.0.SelfAttention.{p}.weight"),
says where it goes (a dense-tree path template, an expert weight, or a tied copy to check and drop),
whether torch's Linear [out, in] layout is transposed to [in, out], the source shape the config
implies, and the bindings of the template's fields for which the tensor exists. The same table both
matches the tensors found in the source and lists the tensors the source must have.

HF facts (transformers 5 `modeling_switch_transformers.py`): the encoder FFN is `layer.1`, the
decoder FFN `layer.2` (its `layer.1` is cross-attention); only block 0 holds
`relative_attention_bias`; `lm_head.weight`, `{stack}.embed_tokens.weight` are tied to
`shared.weight` when `tie_word_embeddings` (safetensors omits them, `pytorch_model.bin` may not).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Iterable

from swapmoe_jax.models.switch.config import SwitchConfig

Binding = dict[str, str]

DENSE, EXPERT, TIED = "dense", "expert", "tied"
_FFN_LAYER = {"encoder": "1", "decoder": "2"}


def _blocks(cfg: SwitchConfig, kind: str = "all", stacks: Iterable[str] = ("encoder", "decoder"),
            **extra: Iterable[str]) -> list[Binding]:
  """Bindings {stack, i, f (FFN layer index), *extra} of the blocks of `kind` ("all", "dense", "sparse")."""
  out = []
  for stack in stacks:
    n = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
    sparse = set(cfg.encoder_sparse_layers if stack == "encoder" else cfg.decoder_sparse_layers)
    for i in range(n):
      if kind == "all" or (kind == "sparse") == (i in sparse):
        base = {"stack": stack, "i": str(i), "f": _FFN_LAYER[stack]}
        for values in itertools.product(*extra.values()):
          out.append(base | dict(zip(extra, values)))
  return out


def _stacks(cfg: SwitchConfig) -> list[Binding]:
  del cfg
  return [{"stack": "encoder"}, {"stack": "decoder"}]


def _once(cfg: SwitchConfig) -> list[Binding]:
  del cfg
  return [{}]


def _experts(cfg: SwitchConfig) -> list[Binding]:
  return [b | {"j": str(j)} for b in _blocks(cfg, "sparse") for j in range(cfg.num_experts)]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor family.

  Attributes:
    source: HF name template; fields in braces.
    kind: DENSE (goes to `dest` in the dense tree), EXPERT (`dest` is "wi" or "wo" of expert {j} of
      the MoE layer in block {i} of {stack}), or TIED (a copy of shared.weight: shape-checked, dropped).
    dest: dense-tree path template with "." separators, or "wi"/"wo" for EXPERT rules.
    transpose: torch Linear weight [out, in] -> [in, out].
    shape: expected source shape for a config.
    scope: the field bindings for which the tensor exists in a config.
    required: whether a source must contain it (for that config).
  """

  source: str
  kind: str
  dest: str
  transpose: bool
  shape: Callable[[SwitchConfig], tuple[int, ...]]
  scope: Callable[[SwitchConfig], list[Binding]]
  required: Callable[[SwitchConfig], bool] = lambda cfg: True

  @functools.cached_property
  def pattern(self) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", self.source)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>[A-Za-z0-9_]+)" for k, p in enumerate(parts))
    return re.compile(regex + r"\Z")

  def names(self, cfg: SwitchConfig) -> list[str]:
    """Every concrete HF name of this rule for `cfg`."""
    return [self.source.format(**b) for b in self.scope(cfg)]


_D = lambda c: (c.d_model,)  # noqa: E731
_ATTN_IN = lambda c: (c.inner_dim, c.d_model)  # noqa: E731  q, k, v: [H*C, D]
_ATTN_OUT = lambda c: (c.d_model, c.inner_dim)  # noqa: E731  o: [D, H*C]
_EMBED = lambda c: (c.vocab_size, c.d_model)  # noqa: E731
_tied = lambda c: c.tie_word_embeddings  # noqa: E731
_SELF = "{stack}.block.{i}.layer.0"
_CROSS = "decoder.block.{i}.layer.1"
_FFN = "{stack}.block.{i}.layer.{f}"

RULES: tuple[Rule, ...] = (
    Rule("shared.weight", DENSE, "shared", False, _EMBED, _once),
    Rule("lm_head.weight", DENSE, "lm_head", True, _EMBED, lambda c: [] if _tied(c) else [{}]),
    Rule("lm_head.weight", TIED, "", False, _EMBED, lambda c: [{}] if _tied(c) else [],
         required=lambda c: False),
    # Input embeddings of each stack: copies of shared.weight in every released (tied) checkpoint;
    # transformers 5 unties them together with the LM head, and the stacks then use their own.
    # Absent from an untied source (older format), the loader falls back to shared.weight.
    Rule("{stack}.embed_tokens.weight", TIED, "", False, _EMBED, lambda c: _stacks(c) if _tied(c) else [],
         required=lambda c: False),
    Rule("{stack}.embed_tokens.weight", DENSE, "{stack}.embed", False, _EMBED,
         lambda c: [] if _tied(c) else _stacks(c), required=lambda c: False),
    Rule("{stack}.final_layer_norm.weight", DENSE, "{stack}.final_norm", False, _D, _stacks),
    Rule("{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight", DENSE, "{stack}.rel_bias",
         False, lambda c: (c.relative_attention_num_buckets, c.num_heads),
         lambda c: [b for b in _blocks(c) if b["i"] == "0"]),
    Rule(_SELF + ".layer_norm.weight", DENSE, "{stack}.blocks.{i}.attn_norm", False, _D, _blocks),
    Rule(_SELF + ".SelfAttention.{p}.weight", DENSE, "{stack}.blocks.{i}.attn.{p}", True, _ATTN_IN,
         lambda c: _blocks(c, p="qkv")),
    Rule(_SELF + ".SelfAttention.o.weight", DENSE, "{stack}.blocks.{i}.attn.o", True, _ATTN_OUT, _blocks),
    Rule(_CROSS + ".layer_norm.weight", DENSE, "decoder.blocks.{i}.cross_norm", False, _D,
         lambda c: _blocks(c, stacks=["decoder"])),
    Rule(_CROSS + ".EncDecAttention.{p}.weight", DENSE, "decoder.blocks.{i}.cross.{p}", True, _ATTN_IN,
         lambda c: _blocks(c, stacks=["decoder"], p="qkv")),
    Rule(_CROSS + ".EncDecAttention.o.weight", DENSE, "decoder.blocks.{i}.cross.o", True, _ATTN_OUT,
         lambda c: _blocks(c, stacks=["decoder"])),
    Rule(_FFN + ".layer_norm.weight", DENSE, "{stack}.blocks.{i}.ffn_norm", False, _D, _blocks),
    Rule(_FFN + ".mlp.wi.weight", DENSE, "{stack}.blocks.{i}.mlp.wi", True, lambda c: (c.d_ff, c.d_model),
         lambda c: _blocks(c, "dense")),
    Rule(_FFN + ".mlp.wo.weight", DENSE, "{stack}.blocks.{i}.mlp.wo", True, lambda c: (c.d_model, c.d_ff),
         lambda c: _blocks(c, "dense")),
    Rule(_FFN + ".mlp.router.classifier.weight", DENSE, "{stack}.blocks.{i}.router.w", True,
         lambda c: (c.num_experts, c.d_model), lambda c: _blocks(c, "sparse")),
    Rule(_FFN + ".mlp.router.classifier.bias", DENSE, "{stack}.blocks.{i}.router.b", False,
         lambda c: (c.num_experts,), lambda c: _blocks(c, "sparse") if c.router_bias else []),
    Rule(_FFN + ".mlp.experts.expert_{j}.wi.weight", EXPERT, "wi", True, lambda c: (c.d_ff, c.d_model), _experts),
    Rule(_FFN + ".mlp.experts.expert_{j}.wo.weight", EXPERT, "wo", True, lambda c: (c.d_model, c.d_ff), _experts),
)


@dataclasses.dataclass(frozen=True)
class Match:
  rule: Rule
  binding: Binding

  @property
  def dest(self) -> str:
    return self.rule.dest.format(**self.binding)


class Unexpected(Exception):
  """A known tensor family at a place the config does not have (a reason is the message)."""


def match(name: str, cfg: SwitchConfig) -> Match | None:
  """The rule and field binding of HF tensor `name`, or None when no rule knows the name.

  Raises:
    Unexpected: the name is a SwitchTransformers tensor, but `cfg` has no such tensor.
  """
  near = None
  for rule in RULES:
    m = rule.pattern.match(name)
    if m is None:
      continue
    binding = m.groupdict()
    if _key(binding) in _scope_keys(rule, cfg):
      return Match(rule, binding)
    near = near or (rule, binding)
  if near is None:
    return None
  raise Unexpected(_why_unexpected(*near, cfg))


def _key(binding: Binding) -> tuple[tuple[str, str], ...]:
  return tuple(sorted(binding.items()))


@functools.lru_cache(maxsize=64)
def _scope_keys(rule: Rule, cfg: SwitchConfig) -> frozenset:
  fields = rule.pattern.groupindex.keys()
  return frozenset(_key({k: v for k, v in b.items() if k in fields}) for b in rule.scope(cfg))


def _why_unexpected(rule: Rule, b: Binding, cfg: SwitchConfig) -> str:
  if "stack" in b and b["stack"] in _FFN_LAYER:
    stack = b["stack"]
    n = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
    if "i" in b and (not b["i"].isdigit() or int(b["i"]) >= n):
      return f"config.json has {n} {stack} blocks"
    if "f" in b and b["f"] != _FFN_LAYER[stack]:
      return f"the {stack} feed-forward sublayer is layer.{_FFN_LAYER[stack]}"
    sparse = cfg.encoder_sparse_layers if stack == "encoder" else cfg.decoder_sparse_layers
    if "i" in b and rule.source.endswith((".mlp.wi.weight", ".mlp.wo.weight")):
      return f"config.json makes {stack} block {b['i']} sparse (sparse blocks: {list(sparse)})"
    if ("i" in b and ".mlp.router." in rule.source) or "j" in b:
      if "i" in b and int(b["i"]) not in sparse:
        return f"config.json makes {stack} block {b['i']} dense (sparse blocks: {list(sparse)})"
      if "j" in b and (not b["j"].isdigit() or int(b["j"]) >= cfg.num_experts):
        return f"expert count mismatch: config.json says num_experts={cfg.num_experts}"
      if rule.source.endswith(".bias"):
        return "config.json has router_bias=false"
  return "config.json has no such tensor"


def required_names(cfg: SwitchConfig) -> set[str]:
  """Every HF tensor name a source for `cfg` must contain."""
  return {name for rule in RULES if rule.required(cfg) for name in rule.names(cfg)}
