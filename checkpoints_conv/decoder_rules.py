"""HF decoder-only MoE tensor names (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) -> the checkpoint layout.

One table of rules, as `rules.RULES` is for SwitchTransformers: each rule names an HF tensor by a
template, says where it goes, whether torch's Linear [out, in] is transposed to [in, out], the source
shape the config implies and the bindings for which the tensor exists.

HF facts (transformers 5.24, checked with `save_pretrained` of tiny models):
- Mixtral: `model.layers.{i}.block_sparse_moe.gate.weight` [E, D] and
  `block_sparse_moe.experts.{j}.w1|w3|w2.weight` (w1 = gate [F, D], w3 = up [F, D], w2 = down [D, F]).
  In memory (and so in a `torch.save` of a state dict) the prefix is `mlp.`, as for the others.
- Qwen2-MoE, Qwen3-MoE, OLMoE: `model.layers.{i}.mlp.gate.weight` [E, D] and
  `mlp.experts.{j}.gate_proj|up_proj|down_proj.weight`; Qwen2-MoE adds `mlp.shared_expert.*_proj.weight`
  and `mlp.shared_expert_gate.weight` [1, D]. Dense blocks of Qwen2/3-MoE (`mlp_only_layers`, sparse
  step): `mlp.gate_proj|up_proj|down_proj.weight`.
- The in-memory fused layout: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and
  `mlp.experts.down_proj` [E, D, F] (transformers' `conversion_mapping.py` builds it by concatenating
  gate and up along dim 1 of the stacked experts).
- Attention: `self_attn.{q,k,v,o}_proj.weight`; q/k/v `.bias` for Qwen2-MoE (`qkv_bias`), q/k/v/o `.bias`
  for Qwen3-MoE and OLMoE with `attention_bias`; `self_attn.q_norm|k_norm.weight` per head [C] (Qwen3)
  or over all heads [H*C], [Hkv*C] (OLMoE).
- `lm_head.weight` is absent from a tied safetensors file (and equal to `model.embed_tokens.weight` in
  a state dict).

Experts are written as {"wi": [D, 2F] = concat(gate, up).T, "wo": [F, D] = down.T}; the `part` of a
rule says which rows of wi a tensor holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from checkpoints_conv import rules

if TYPE_CHECKING:
  from swapmoe_jax.models.decoder.config import DecoderConfig

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

DENSE, EXPERT, FUSED, TIED = "dense", "expert", "fused", "tied"
GATE, UP = 0, 1  # the halves of wi [2F, D] (torch layout), gate rows first

Binding = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Rule(rules.Rule):
  """`rules.Rule` plus `part`: GATE or UP when the tensor is one half of a wi matrix, else None.

  Kinds: DENSE (into the dense tree at `dest`), EXPERT (`dest` "wi" or "wo" of expert {j} of block {i}),
  FUSED (`dest` "wi" or "wo" of every expert of block {i}, stacked on axis 0), TIED (a copy of the
  input embedding: compared, dropped).
  """

  part: int | None = None


def _blocks(cfg, kind: str = "all", **extra: Iterable[str]) -> list[Binding]:
  """Bindings {i, *extra} of the blocks of `kind` ("all", "dense", "sparse")."""
  sparse = set(cfg.sparse_layers)
  out = []
  for i in range(cfg.num_layers):
    if kind == "all" or (kind == "sparse") == (i in sparse):
      out += [{"i": str(i)} | dict(zip(extra, v)) for v in itertools.product(*extra.values())]
  return out


def _once(cfg) -> list[Binding]:
  del cfg
  return [{}]


def _mixtral(cfg) -> bool:
  return cfg.model_type == "mixtral"


def _experts(cfg) -> list[Binding]:
  return [b | {"j": str(j)} for b in _blocks(cfg, "sparse") for j in range(cfg.num_experts)]


def _only(pred, scope):
  return lambda cfg: scope(cfg) if pred(cfg) else []


_never = lambda cfg: False  # noqa: E731
_D = lambda c: (c.hidden_size,)  # noqa: E731
_Q = lambda c: c.num_heads * c.head_dim  # noqa: E731
_KV = lambda c: c.num_kv_heads * c.head_dim  # noqa: E731
_EMBED = lambda c: (c.vocab_size, c.hidden_size)  # noqa: E731
_FD_SHAPE = lambda f: lambda c: (f(c), c.hidden_size)  # noqa: E731  gate, up: [F, D]
_DF_SHAPE = lambda f: lambda c: (c.hidden_size, f(c))  # noqa: E731  down: [D, F]
_F = lambda c: c.moe_d_ff  # noqa: E731
_FS = lambda c: c.shared_d_ff  # noqa: E731
_FD = lambda c: c.dense_d_ff  # noqa: E731
_L = "model.layers.{i}"
_A = _L + ".self_attn"
_M = _L + ".mlp"
_X = _L + ".block_sparse_moe"
_tied = lambda c: c.tie_word_embeddings  # noqa: E731
_not_mixtral = lambda c: not _mixtral(c)  # noqa: E731
_bias = lambda c: c.attention_bias  # noqa: E731
_o_bias = lambda c: c.output_bias  # noqa: E731
_shared = lambda c: c.shared_d_ff is not None  # noqa: E731
_dense = lambda c: _blocks(c, "dense")  # noqa: E731
_sparse = lambda c: _blocks(c, "sparse")  # noqa: E731
_ROUTER = lambda c: (c.num_experts, c.hidden_size)  # noqa: E731
_FUSED_WI = lambda c: (c.num_experts, 2 * c.moe_d_ff, c.hidden_size)  # noqa: E731  gate_up_proj [E, 2F, D]
_FUSED_WO = lambda c: (c.num_experts, c.hidden_size, c.moe_d_ff)  # noqa: E731  down_proj [E, D, F]


def _norm_shape(heads):
  return lambda c: (c.head_dim,) if c.qk_norm == "head" else (heads(c),)


RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", DENSE, "embed", False, _EMBED, _once),
    Rule("lm_head.weight", DENSE, "lm_head", True, _EMBED, lambda c: [] if _tied(c) else [{}]),
    Rule("lm_head.weight", TIED, "", False, _EMBED, lambda c: [{}] if _tied(c) else [], required=_never),
    Rule("model.norm.weight", DENSE, "final_norm", False, _D, _once),
    Rule(_L + ".input_layernorm.weight", DENSE, "blocks.{i}.attn_norm", False, _D, _blocks),
    Rule(_L + ".post_attention_layernorm.weight", DENSE, "blocks.{i}.ffn_norm", False, _D, _blocks),
    Rule(_A + ".q_proj.weight", DENSE, "blocks.{i}.attn.q", True, lambda c: (_Q(c), c.hidden_size), _blocks),
    Rule(_A + ".{p}_proj.weight", DENSE, "blocks.{i}.attn.{p}", True, lambda c: (_KV(c), c.hidden_size),
         lambda c: _blocks(c, p="kv")),
    Rule(_A + ".o_proj.weight", DENSE, "blocks.{i}.attn.o", True, lambda c: (c.hidden_size, _Q(c)), _blocks),
    Rule(_A + ".q_proj.bias", DENSE, "blocks.{i}.attn.q_b", False, lambda c: (_Q(c),), _only(_bias, _blocks)),
    Rule(_A + ".{p}_proj.bias", DENSE, "blocks.{i}.attn.{p}_b", False, lambda c: (_KV(c),),
         _only(_bias, lambda c: _blocks(c, p="kv"))),
    Rule(_A + ".o_proj.bias", DENSE, "blocks.{i}.attn.o_b", False, _D, _only(_o_bias, _blocks)),
    Rule(_A + ".q_norm.weight", DENSE, "blocks.{i}.attn.q_norm", False, _norm_shape(_Q),
         _only(lambda c: c.qk_norm is not None, _blocks)),
    Rule(_A + ".k_norm.weight", DENSE, "blocks.{i}.attn.k_norm", False, _norm_shape(_KV),
         _only(lambda c: c.qk_norm is not None, _blocks)),
    # Dense blocks (Qwen2/3-MoE `mlp_only_layers` or a sparse step > 1).
    Rule(_M + ".gate_proj.weight", DENSE, "blocks.{i}.mlp.wi", True, _FD_SHAPE(_FD), _dense, part=GATE),
    Rule(_M + ".up_proj.weight", DENSE, "blocks.{i}.mlp.wi", True, _FD_SHAPE(_FD), _dense, part=UP),
    Rule(_M + ".down_proj.weight", DENSE, "blocks.{i}.mlp.wo", True, _DF_SHAPE(_FD), _dense),
    # MoE blocks: router, shared expert (Qwen2-MoE), experts one by one or fused.
    Rule(_X + ".gate.weight", DENSE, "blocks.{i}.router.w", True, _ROUTER, _only(_mixtral, _sparse)),
    Rule(_M + ".gate.weight", DENSE, "blocks.{i}.router.w", True, _ROUTER, _only(_not_mixtral, _sparse)),
    Rule(_M + ".shared_expert.gate_proj.weight", DENSE, "blocks.{i}.shared.wi", True, _FD_SHAPE(_FS),
         _only(_shared, _sparse), part=GATE),
    Rule(_M + ".shared_expert.up_proj.weight", DENSE, "blocks.{i}.shared.wi", True, _FD_SHAPE(_FS),
         _only(_shared, _sparse), part=UP),
    Rule(_M + ".shared_expert.down_proj.weight", DENSE, "blocks.{i}.shared.wo", True, _DF_SHAPE(_FS),
         _only(_shared, _sparse)),
    Rule(_M + ".shared_expert_gate.weight", DENSE, "blocks.{i}.shared.gate", True, lambda c: (1, c.hidden_size),
         _only(_shared, _sparse)),
    Rule(_X + ".experts.{j}.w1.weight", EXPERT, "wi", True, _FD_SHAPE(_F), _only(_mixtral, _experts), _never, GATE),
    Rule(_X + ".experts.{j}.w3.weight", EXPERT, "wi", True, _FD_SHAPE(_F), _only(_mixtral, _experts), _never, UP),
    Rule(_X + ".experts.{j}.w2.weight", EXPERT, "wo", True, _DF_SHAPE(_F), _only(_mixtral, _experts), _never),
    Rule(_M + ".experts.{j}.gate_proj.weight", EXPERT, "wi", True, _FD_SHAPE(_F), _only(_not_mixtral, _experts),
         _never, GATE),
    Rule(_M + ".experts.{j}.up_proj.weight", EXPERT, "wi", True, _FD_SHAPE(_F), _only(_not_mixtral, _experts),
         _never, UP),
    Rule(_M + ".experts.{j}.down_proj.weight", EXPERT, "wo", True, _DF_SHAPE(_F), _only(_not_mixtral, _experts),
         _never),
    Rule(_X + ".experts.gate_up_proj", FUSED, "wi", False, _FUSED_WI, _only(_mixtral, _sparse), _never),
    Rule(_X + ".experts.down_proj", FUSED, "wo", False, _FUSED_WO, _only(_mixtral, _sparse), _never),
    Rule(_M + ".experts.gate_up_proj", FUSED, "wi", False, _FUSED_WI, _only(_not_mixtral, _sparse), _never),
    Rule(_M + ".experts.down_proj", FUSED, "wo", False, _FUSED_WO, _only(_not_mixtral, _sparse), _never),
)

_MIXTRAL_IN_MEMORY = re.compile(r"(model\.layers\.\d+)\.mlp\.")


class Table:
  """The rules bound to one config: matches names, lists the required ones."""

  def __init__(self, cfg: DecoderConfig):
    self.cfg = cfg
    self._scopes = {rule: {_key({k: v for k, v in b.items() if k in rule.pattern.groupindex})
                           for b in rule.scope(cfg)} for rule in RULES}

  def canonical(self, name: str) -> str:
    """The name as `save_pretrained` writes it: Mixtral's in-memory `mlp.` prefix is `block_sparse_moe.`."""
    return _MIXTRAL_IN_MEMORY.sub(r"\1.block_sparse_moe.", name) if _mixtral(self.cfg) else name

  def match(self, name: str) -> rules.Match | None:
    """The rule and field binding of HF tensor `name`, or None when no rule knows the name.

    Raises:
      rules.Unexpected: a tensor of these families that `cfg` does not have (the reason is the message).
    """
    name = self.canonical(name)
    near = None
    for rule in RULES:
      m = rule.pattern.match(name)
      if m is None:
        continue
      binding = m.groupdict()
      if _key(binding) in self._scopes[rule]:
        return rules.Match(rule, binding)
      near = near or (rule, binding)
    if near is None:
      return None
    raise rules.Unexpected(self._why_unexpected(*near))

  def required_names(self) -> set[str]:
    """Every HF tensor name a source must contain, experts aside (they come one by one or fused)."""
    return {name for rule in RULES if rule.required(self.cfg) for name in rule.names(self.cfg)}

  def _why_unexpected(self, rule: Rule, b: Binding) -> str:
    cfg = self.cfg
    if ".block_sparse_moe." in rule.source and not _mixtral(cfg):
      return f"not a tensor of model_type {cfg.model_type!r}"
    if "i" in b and (not b["i"].isdigit() or int(b["i"]) >= cfg.num_layers):
      return f"config.json has {cfg.num_layers} layers"
    sparse = list(cfg.sparse_layers)
    moe = rule.kind in (EXPERT, FUSED) or rule.dest.endswith(".router.w") or ".shared." in rule.dest
    if "i" in b and ".mlp.w" in rule.dest:
      return f"config.json makes block {b['i']} sparse (sparse blocks: {sparse})"
    if "i" in b and moe and int(b["i"]) not in sparse:
      return f"config.json makes block {b['i']} dense (sparse blocks: {sparse})"
    if "j" in b and (not b["j"].isdigit() or int(b["j"]) >= cfg.num_experts):
      return f"expert count mismatch: config.json says num_experts={cfg.num_experts}"
    if ".shared." in rule.dest:
      return "config.json has no shared expert (shared_expert_intermediate_size)"
    if rule.source.endswith(".bias"):
      return "config.json has no such attention bias (attention_bias / qkv_bias)"
    if "_norm" in rule.dest:
      return f"model_type {cfg.model_type!r} has no q/k norm"
    return "config.json has no such tensor"


def _key(binding: Binding) -> tuple[tuple[str, str], ...]:
  return tuple(sorted(binding.items()))

