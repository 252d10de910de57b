"""The converter run backwards: this project's weights -> a Hugging Face state dict.

Driven by the same rule tables as the converter (`rules.RULES` for SwitchTransformers,
`decoder_rules.RULES` for the decoder-only families), so export and import cannot drift: a model trained
here (`swapmoe_jax.train`) is saved as a standard HF folder and then converted like any other checkpoint.
"""

from __future__ import annotations

import numpy as np

from checkpoints_conv import decoder_rules, rules
from swapmoe_jax.models.switch.config import SwitchConfig


def _get(tree: dict, path: str):
  node = tree
  for part in path.split("."):
    node = node[int(part) if isinstance(node, (list, tuple)) or part not in node and part.isdigit() else part]
  return node


def hf_state_dict(cfg: SwitchConfig, dense: dict, experts: dict) -> dict[str, np.ndarray]:
  """HF tensor name -> array, every tensor a source for `cfg` must hold (`rules.required_names`).

  Args:
    cfg: the model configuration.
    dense: the dense tree in the checkpoint layout (`checkpoint.restore_dense`): paths such as
      `encoder.blocks.0.attn.q` ([in, out] layout), `decoder.blocks.1.router.w`, `shared`.
    experts: (stack, block) -> {"wi": [E, D, F], "wo": [E, F, D]}.
  """
  out = {}
  for rule in rules.RULES:
    if rule.kind == rules.TIED:
      continue
    for b in rule.scope(cfg):
      name = rule.source.format(**b)
      if rule.kind == rules.DENSE:
        x = np.asarray(_get(dense, rule.dest.format(**b)))
      else:
        x = np.asarray(experts[(b["stack"], int(b["i"]))][rule.dest][int(b["j"])])
      out[name] = np.ascontiguousarray(x.T if rule.transpose else x)
      if out[name].shape != rule.shape(cfg):
        raise ValueError(f"{name}: exported shape {out[name].shape}, config implies {rule.shape(cfg)}")
  missing = rules.required_names(cfg) - out.keys()
  if missing:
    raise ValueError(f"export lacks required tensors: {sorted(missing)[:5]}")
  return out


def hf_decoder_state_dict(cfg, dense: dict, experts: dict) -> dict[str, np.ndarray]:
  """HF tensor name -> array for a decoder-only family, named as `save_pretrained` writes them (experts
  one by one; no lm_head when tied).

  Args:
    cfg: the `DecoderConfig`.
    dense: the dense tree in the checkpoint layout (`checkpoint.restore_dense`).
    experts: block index -> {"wi": [E, D, 2F], "wo": [E, F, D]} (`checkpoint.restore_experts`' layout).
  """
  out = {}
  for rule in decoder_rules.RULES:
    if rule.kind in (decoder_rules.TIED, decoder_rules.FUSED):
      continue
    for b in rule.scope(cfg):
      name = rule.source.format(**b)
      if rule.kind == decoder_rules.DENSE:
        x = np.asarray(_get(dense, rule.dest.format(**b)))
      else:
        x = np.asarray(experts[int(b["i"])][rule.dest][int(b["j"])])
      if rule.part is not None:  # wi [D, 2F]: gate columns, then up
        half = x.shape[1] // 2
        x = x[:, rule.part * half:(rule.part + 1) * half]
      out[name] = np.ascontiguousarray(x.T if rule.transpose else x)
      if out[name].shape != rule.shape(cfg):
        raise ValueError(f"{name}: exported shape {out[name].shape}, config implies {rule.shape(cfg)}")
  missing = decoder_rules.Table(cfg).required_names() - out.keys()
  if missing:
    raise ValueError(f"export lacks required tensors: {sorted(missing)[:5]}")
  return out
