"""The built-in demo model: a tiny Switch Transformer with RANDOM weights.

Until the project ships its trained default model, `python -m swapmoe_jax.generate` without `--model`
runs this stand-in. Its weights are random, so its outputs are gibberish: it exists to show the whole
pipeline (conversion, budgets, swapping, streaming, statistics) working end to end offline, in seconds.

The model is built with `transformers` (torch is needed only to build it once: `pip install -e ".[test]"`),
saved with the small sentencepiece tokenizer in `swapmoe_jax/builtin/assets/demo_tokenizer/` (96 pieces), and
converted with `checkpoints_conv.convert` into a cache folder that later calls reuse.
"""

from __future__ import annotations

import os
import shutil
import tempfile

DEMO_NAME = "demo-tiny-random"
DEMO_NOTICE = ("tiny, random weights: its outputs are gibberish; a stand-in until the trained default model "
               "ships")
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_tokenizer")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")

# A SwitchTransformersConfig like the tests' tiny one, with 8 experts and the released models' layout:
# 4 + 4 blocks, every second block sparse.
_CONFIG = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=4, num_decoder_layers=4,
    num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=64,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0, initializer_factor=8.0,
)
_SEED = 0
# Router weights re-drawn from N(0, 4²) (as tests/hf_fixtures.make_hf_model does): large routing margins,
# so that tokens spread over the experts and float noise does not flip decisions.
_ROUTER_STD = 4.0


class DemoUnavailableError(ImportError):
  """The demo model cannot be built here (torch or transformers missing)."""


def cache_root() -> str:
  """The cache folder of swapmoe_jax: $SWAPMOE_CACHE, else `~/.cache/swapmoe_jax`."""
  root = os.environ.get("SWAPMOE_CACHE") or os.path.join("~", ".cache", "swapmoe_jax")
  return os.path.abspath(os.path.expanduser(root))


def demo_checkpoint(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
  """The folder of the converted demo model, building and converting it on first use.

  The demo model is a tiny Switch Transformer with RANDOM weights (V=96, D=32, 4+4 blocks, 2+2 MoE
  layers of 8 experts): its outputs are gibberish. It is a stand-in for the trained default model that
  the project will ship; it lets the command line run end to end, offline.

  Args:
    cache_dir: where the converted checkpoint lives; default `<cache root>/demo-tiny-random`, the cache
      root being $SWAPMOE_CACHE or `~/.cache/swapmoe_jax`. An existing complete conversion is reused.
    progress: show the converter's progress bar.

  Returns:
    The absolute path of the converted checkpoint folder.

  Raises:
    DemoUnavailableError: torch or transformers is not installed (install the `test` extra).
    checkpoints_conv.ConversionError: `cache_dir` exists, is not empty and is not a converted checkpoint.
  """
  from swapmoe_jax import checkpoint as ckpt

  out = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else os.path.join(cache_root(), DEMO_NAME))
  if ckpt.is_complete(out):
    return out
  try:
    import torch
    import transformers
  except ImportError as e:
    raise DemoUnavailableError(
        f"the built-in demo model needs torch and transformers to be built once ({e}); install them with "
        "pip install -e \".[test]\", or pass --model with a converted checkpoint") from None
  from checkpoints_conv import ConversionError, convert

  overwrite = False
  if os.path.lexists(out):
    if os.path.isdir(out) and not os.listdir(out):
      os.rmdir(out)
    elif ckpt.is_converted_checkpoint(out):
      overwrite = True  # metadata present but unreadable: an incomplete or damaged conversion
    else:
      raise ConversionError(f"{out} exists and is not a converted checkpoint; remove it or pick another folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=DEMO_NAME + ".hf-", dir=parent) as hf_dir:
    model = build_hf_model(torch, transformers)
    model.save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
      shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(hf_dir, name))
    try:
      return convert(hf_dir, out, dtype="float32", progress=progress, overwrite=overwrite)
    except ConversionError:
      if ckpt.is_complete(out):  # another process converted it meanwhile
        return out
      raise


DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")
DEFAULT_NOTICE = ("a small Switch Transformer (16 experts per MoE layer) trained by this project on 10 synthetic "
                  "tasks: reverse, sort, add, upper, count, dedupe, shift, convert, max, sum — e.g. "
                  "--prompt \"sort: 5 2 9\"")


class DefaultModelMissingError(FileNotFoundError):
  """The package was installed without its built-in model."""


def default_checkpoint(progress: bool = False) -> str:
  """The folder of the built-in default model's converted checkpoint (what `load` takes).

  The model ships inside the package (`swapmoe_jax/builtin/assets/default_model`, a few MB): a small Switch
  Transformer trained with `python -m swapmoe_jax.train` on the tasks of `swapmoe_jax.builtin.tasks`; its
  `TRAINING.json` records the settings and the held-out exact match.

  Raises:
    DefaultModelMissingError: the package was installed without its assets.
  """
  from swapmoe_jax import checkpoint as ckpt

  del progress  # nothing to build: the checkpoint ships converted
  if not ckpt.is_complete(DEFAULT_MODEL_DIR):
    raise DefaultModelMissingError(
        f"the built-in model is missing from {DEFAULT_MODEL_DIR}; reinstall swapmoe_jax with its package data, "
        "or pass --model")
  return DEFAULT_MODEL_DIR


def build_hf_model(torch, transformers):
  """The random demo model as a transformers SwitchTransformersForConditionalGeneration, eval mode."""
  cfg = transformers.SwitchTransformersConfig(**_CONFIG)
  torch.manual_seed(_SEED)
  model = transformers.SwitchTransformersForConditionalGeneration(cfg)
  gen = torch.Generator().manual_seed(_SEED + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".router.classifier." in name:
        p.copy_(torch.randn(p.shape, generator=gen) * (_ROUTER_STD if name.endswith("weight") else 0.1))
  return model.eval()
