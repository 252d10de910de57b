"""Tiny Hugging Face SwitchTransformers models for tests: build, save in every source format, convert.

Everything is offline: random weights from `transformers`, and the committed tokenizer in
`tests/data/tokenizer` (sentencepiece unigram, 96 pieces, pad 0, eos 1, unk 2, no bos; see
`tests/data/tokenizer/build_tokenizer.py`).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokenizer")
FORMATS = ("safetensors", "sharded", "bin", "sharded_bin")

_TINY = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
    num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
)


def tiny_config(**overrides) -> transformers.SwitchTransformersConfig:
  """A tiny SwitchTransformersConfig: V=96, D=32, C=8, F=48, H=4, 2+2 blocks, E=4, every block sparse.

  `num_sparse_encoder_layers=1` (with 2 blocks) makes block 0 dense and block 1 sparse, as in the
  released models (sparse step 2). `dropout_rate=0` so that train-mode code paths stay deterministic.
  """
  return transformers.SwitchTransformersConfig(**(_TINY | overrides))


def make_hf_model(cfg: transformers.SwitchTransformersConfig | None = None, seed: int = 0,
                  router_std: float | None = None) -> transformers.SwitchTransformersForConditionalGeneration:
  """A random tiny model in eval mode, float32.

  Args:
    cfg: from `tiny_config`; default `tiny_config()`.
    seed: torch seed of the initialisation.
    router_std: if set, re-draws every router weight from N(0, router_std²). HF's own initialisation
      (std 1.0) already spreads tokens over all experts of the tiny model; larger values make the
      routing margins (top-1 vs top-2 logit) larger, so that float noise cannot flip a decision.

  With `tie_word_embeddings=False`, transformers 5 gives each stack its own randomly initialised
  `embed_tokens` (used by the stacks; `shared` is then unused); they are kept distinct here, so that
  parity tests see the difference.
  """
  cfg = cfg if cfg is not None else tiny_config()
  torch.manual_seed(seed)
  model = transformers.SwitchTransformersForConditionalGeneration(cfg)
  with torch.no_grad():
    if router_std is not None:
      gen = torch.Generator().manual_seed(seed + 1)
      for name, p in model.named_parameters():
        if ".router.classifier." in name:
          p.copy_(torch.randn(p.shape, generator=gen) * (router_std if name.endswith("weight") else 0.1))
  return model.eval()


def save_hf(model: transformers.PreTrainedModel, folder: str | os.PathLike, fmt: str = "safetensors",
            tokenizer: bool = False) -> str:
  """Saves `model` the way HF checkpoints come.

  Args:
    fmt: "safetensors" (one `model.safetensors`), "sharded" (`model.safetensors.index.json` + shards),
      "bin" (`pytorch_model.bin`) or "sharded_bin" (`pytorch_model.bin.index.json` + shards). The
      `.bin` forms are written with `torch.save` of the full state dict, tied copies included, as
      transformers 4 did: transformers 5 writes safetensors even with `safe_serialization=False`.
    tokenizer: also copy the committed test tokenizer.

  Returns:
    The folder, as a string.
  """
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  if fmt == "safetensors":
    model.save_pretrained(folder)
    _expect(folder, "model.safetensors")
  elif fmt == "sharded":
    model.save_pretrained(folder, max_shard_size="40KB")
    _expect(folder, "model.safetensors.index.json")
  elif fmt in ("bin", "sharded_bin"):
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "bin":
      torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
      names = list(state)
      shards = [names[k:k + len(names) // 3 + 1] for k in range(0, len(names), len(names) // 3 + 1)]
      weight_map = {}
      for n, part in enumerate(shards):
        file = f"pytorch_model-{n + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in part}, os.path.join(folder, file))
        weight_map |= {k: file for k in part}
      with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
  else:
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
  if tokenizer:
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
      shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(folder, name))
  return folder


def _expect(folder: str, name: str) -> None:
  if not os.path.isfile(os.path.join(folder, name)):
    raise AssertionError(f"save_pretrained did not write {name} in {folder}: {sorted(os.listdir(folder))}")


def state_dict_numpy(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
  """The model's parameters as float32 numpy arrays, HF names and layouts."""
  return {k: v.detach().to(torch.float32).numpy().copy() for k, v in model.state_dict().items()}


def load_tokenizer(folder: str | os.PathLike = TOKENIZER_DIR) -> transformers.PreTrainedTokenizerBase:
  """The test tokenizer (or one copied by the converter). `T5Tokenizer(vocab_file=...)` would silently
  ignore the file in transformers 5; `from_pretrained` reads it."""
  return transformers.T5Tokenizer.from_pretrained(os.fspath(folder))


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory):
  """Factory: (hf kwargs, seed, fmt, dtype) -> (hf model, converted folder), cached for the session."""
  from checkpoints_conv import convert

  cache: dict = {}

  def make(seed: int = 0, fmt: str = "safetensors", dtype: str = "float32", tokenizer: bool = True,
           **cfg_overrides):
    key = (seed, fmt, dtype, tokenizer, tuple(sorted(cfg_overrides.items())))
    if key not in cache:
      root = tmp_path_factory.mktemp("tiny")
      model = make_hf_model(tiny_config(**cfg_overrides), seed=seed)
      src = save_hf(model, root / "hf", fmt=fmt, tokenizer=tokenizer)
      cache[key] = model, convert(src, root / "converted", dtype=dtype, progress=False)
    return cache[key]

  return make


# --- decoder-only MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) -------------------------------

DECODER_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_DECODER_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, max_position_embeddings=128)
# Per family: a config class and tiny sizes that exercise what the family has. Qwen2-MoE: a dense block
# (mlp_only_layers), a shared expert, q/k/v biases, tied embeddings. Qwen3-MoE: head_dim != D/H, a
# dense block, per-head q/k norms. OLMoE: q/k norms over all heads. Mixtral: every block sparse, untied.
_DECODER_TINY = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[1],
                                         tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, num_experts=4, head_dim=6,
                                         mlp_only_layers=[0], norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4)),
}


def tiny_decoder_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
  """A tiny HF config of a decoder-only MoE family: V=96, D=32, 3 blocks, H=4, Hkv=2, E=4, top-2."""
  if model_type not in _DECODER_TINY:
    raise ValueError(f"unknown family {model_type!r}; known: {', '.join(DECODER_FAMILIES)}")
  cls, sizes = _DECODER_TINY[model_type]
  return getattr(transformers, cls)(**(_DECODER_COMMON | sizes | overrides))


def make_decoder_model(model_type: str, seed: int = 0, router_std: float | None = 0.5,
                       **overrides) -> transformers.PreTrainedModel:
  """A random tiny `*ForCausalLM` of `model_type` in eval mode, float32.

  HF initialises norms to 1 and biases to 0, under which a swapped norm or bias would pass unnoticed:
  here every norm weight is 1 + N(0, 0.1²) and every bias N(0, 0.1²). `router_std` re-draws the router
  weights from N(0, router_std²) (HF's std 0.02 leaves top-k decisions to float noise); None keeps them.
  """
  cfg = tiny_decoder_config(model_type, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.1 * noise)
      elif router_std is not None and name.endswith(".gate.weight") and p.shape[0] == cfg_num_experts(cfg):
        p.copy_(router_std * noise)
  return model.eval()


def cfg_num_experts(cfg: transformers.PretrainedConfig) -> int:
  """E of a decoder family's HF config (Mixtral calls it num_local_experts)."""
  return cfg.num_local_experts if cfg.model_type == "mixtral" else cfg.num_experts


def add_chat_tokenizer(folder: str | os.PathLike) -> list[str]:
  """Copies the committed test tokenizer into `folder` with a chat template (`chat_template.jinja`, as
  transformers 5 writes it); returns the file names written."""
  names = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
  for name in names[:2]:
    shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(folder, name))
  with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
    f.write("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
  return names
