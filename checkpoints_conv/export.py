"""The converter run backwards: this project's weights -> a Hugging Face SwitchTransformers state dict.

Driven by the same rule table as the converter (`rules.RULES`), so export and import cannot drift: a
model trained here (`swapmoe_jax.train`) is saved as a standard HF folder and then converted like any
other checkpoint.
"""

from __future__ import annotations

import numpy as np

from checkpoints_conv import rules
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
