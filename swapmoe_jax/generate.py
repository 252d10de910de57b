"""Command line: generate text with a Switch Transformer under a memory budget.

  python -m swapmoe_jax.generate --model google/switch-base-8 --budget 33% --prompt "translate: ..."
  python -m swapmoe_jax.generate --prompt "reverse: cat dog sun"   # the built-in model

`--model` takes a converted checkpoint folder, a Hugging Face folder (config.json + weights) or a hub id;
the latter two are converted once into `<cache root>/models/<name>` (cache root: $SWAPMOE_CACHE or
`~/.cache/swapmoe_jax`). Without `--model`, the built-in model runs: a small Switch Transformer trained by
this project on synthetic tasks (`swapmoe_jax.builtin.tasks`; `sort: 5 2 9`, `add: 37 + 45`, ...).

Tokens are printed to stdout as they come; one statistics line goes to stderr (or everything into one
JSON object on stdout with --json). Exit status 0 on success, 2 on bad input (one `error: ...` line on
stderr), 130 when interrupted, 141 when stdout is closed early (`| head`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time

DEFAULT_PROMPT = "sort: 5 2 9"
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class UsageError(ValueError):
  """Bad command-line input; the message is one line."""


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one `error: ...` line (raised, then printed by `main`)."""

  def error(self, message):
    raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
  from swapmoe_jax.serving.loader import POLICIES

  p = _Parser(prog="python -m swapmoe_jax.generate",
              description="Generate text with a Mixture-of-Experts model (Switch Transformer, Mixtral, "
                                          "Qwen-MoE, OLMoE) under a memory budget (SwapMoE).")
  p.add_argument("--model", metavar="FOLDER|HUB_ID",
                 help="converted checkpoint folder, Hugging Face folder or hub id (converted once into the "
                      "cache); default: the built-in model (trained on synthetic tasks, see swapmoe_jax.builtin.tasks)")
  size = p.add_mutually_exclusive_group()
  size.add_argument("--budget", help="accelerator memory for the model: '4GiB', '512MiB', '33%%' (of the full "
                                     "model's weights), bytes, or '5/16' (resident experts per MoE layer, of "
                                     "16); default: no budget")
  size.add_argument("--experts", type=int, metavar="K",
                    help="the budget that holds K resident experts in every MoE layer (the same as "
                         "--budget K/E); a stored calibration spreads those bytes over the layers by importance")
  p.add_argument("--policy", choices=POLICIES,
                 help="expert residency policy; default 'full' without --budget, 'swapmoe' with one")
  p.add_argument("--planner", type=_planner, default="auto", metavar="{auto,uniform,calibrated,K1,K2,...}",
                 help="slots per layer: 'auto' (default: by the calibration stored with the checkpoint, as the "
                      "built-in model has, else equal), 'uniform' (equal), 'calibrated' (by routing importance "
                      "measured on the prompts), or K per MoE layer, comma-separated (e.g. 6,6,4,4 beside "
                      "--experts 5: the same bytes spread otherwise)")
  p.add_argument("--gate", choices=("original", "renormalized"), default="original",
                 help="gate value after masked routing")
  p.add_argument("--selective-threshold", type=float, metavar="P",
                 help="--policy selective: a missing expert whose router probability is >= P is read from "
                      "host memory, the others redirected (default 0.5; 0: exact routing, above 1: masked)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--prompt", help=f"input text (default {DEFAULT_PROMPT!r}); with a checkpoint that has "
                                    "no tokenizer, space-separated token ids")
  src.add_argument("--input-file", metavar="FILE", help="one prompt per line (blank lines are skipped)")
  p.add_argument("--chat", action="store_true",
                 help="wrap each prompt in the tokenizer's chat template as a user turn (decoder-only models)")
  p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
  p.add_argument("--max-source-len", type=int, default=512, metavar="N",
                 help="longest prompt in tokens that the budget must hold (default 512)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per generate call (default 1)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
  p.add_argument("--staging", choices=("auto", "pageable", "transfer", "gather"), default="auto",
                 help="how swaps copy experts to the device: 'auto' (default: 'gather' on a GPU where every "
                      "expert fits in 32 GiB of pinned host memory, else 'pageable'), 'pageable' (device_put from "
                      "numpy), 'transfer' (device_put from pinned host memory: keeps ~2 KiB of host memory per "
                      "copy) or 'gather' (a jitted read of pinned host banks, on the compute stream)")
  p.add_argument("--json", action="store_true", help="print one JSON object (texts, token ids, stats)")
  p.add_argument("--quiet", action="store_true",
                 help="no notes and no statistics line (progress bars show only on a terminal)")
  return p


def _check_args(args) -> None:
  if args.max_new_tokens < 1:
    raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.batch_size < 1:
    raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.max_source_len < 1:
    raise UsageError(f"--max-source-len must be >= 1, got {args.max_source_len}")
  if not args.temperature >= 0:
    raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
  if args.top_k < 0:
    raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
  if not 0 < args.top_p <= 1:
    raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
  if args.experts is not None and args.experts < 1:
    raise UsageError(f"--experts must be >= 1, got {args.experts}")
  if args.selective_threshold is not None and args.policy != "selective":
    raise UsageError("--selective-threshold needs --policy selective")
  if args.selective_threshold is not None and not args.selective_threshold >= 0:
    raise UsageError(f"--selective-threshold must be >= 0, got {args.selective_threshold}")
  if args.policy not in (None, "full") and args.budget is None and args.experts is None:
    raise UsageError(f"--policy {args.policy} needs a --budget or --experts (e.g. --experts 5)")


def _read_prompts(args) -> list[str]:
  """The prompt texts, in order; raises UsageError for an empty prompt or an unreadable file."""
  if args.input_file is not None:
    try:
      with open(args.input_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      raise UsageError(f"no such input file: {args.input_file}") from None
    except (OSError, UnicodeDecodeError) as e:
      raise UsageError(f"cannot read input file {args.input_file}: {e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
      raise UsageError(f"input file {args.input_file} has no prompts (one per line)")
    return prompts
  prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
  if not prompt.strip():
    raise UsageError("empty prompt; give some text with --prompt")
  return [prompt]


# --- the model folder ------------------------------------------------------------------------------


def cache_name(source: str) -> str:
  """A folder name for `source` (a hub id or a local folder) that cannot leave the cache folder.

  Hub ids: every '/' and every character outside [A-Za-z0-9._-] becomes '_' ("google/switch-base-8" ->
  "google_switch-base-8"). Local folders: their base name plus a hash of the absolute path.

  Raises:
    UsageError: a name that would be empty or made only of dots ('.', '..').
  """
  if os.path.isdir(source):
    path = os.path.abspath(source)
    digest = hashlib.sha256(path.encode()).hexdigest()[:10]
    name = f"{_SAFE_CHARS.sub('_', os.path.basename(path)) or 'model'}-{digest}"
  else:
    name = _SAFE_CHARS.sub("_", source)
  if not name.strip("."):
    raise UsageError(f"cannot derive a cache folder name from {source!r}")
  return name


def resolve_model(model: str | None, *, quiet: bool = False) -> str:
  """The converted checkpoint folder for --model, converting (once, into the cache) when needed."""
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.builtin import demo

  if model is None:
    if not quiet:
      print(f"no --model given: using the built-in model ({demo.DEFAULT_NOTICE})", file=sys.stderr)
    return demo.default_checkpoint()
  if not model.strip():
    raise UsageError("--model is empty")
  if os.path.isdir(model):
    if ckpt.is_converted_checkpoint(model):
      return os.path.abspath(model)
    if not os.path.isfile(os.path.join(model, "config.json")):
      raise UsageError(f"{model} is neither a converted checkpoint (no {ckpt.METADATA_FILE}) nor a Hugging Face "
                       "model folder (no config.json)")
  elif os.path.exists(model):
    raise UsageError(f"--model {model} is a file; pass a checkpoint folder or a hub id")
  from checkpoints_conv import convert

  models = os.path.join(demo.cache_root(), "models")
  out = os.path.join(models, cache_name(model))
  if os.path.commonpath([models, os.path.abspath(out)]) != models or os.path.dirname(out) != models:
    raise UsageError(f"cannot derive a cache folder name from {model!r}")
  if ckpt.is_complete(out):
    return out
  if os.path.lexists(out):  # an interrupted or damaged conversion in our own cache: redo it
    if os.path.isdir(out) and not os.path.islink(out):
      shutil.rmtree(out)
    else:
      os.remove(out)
  if not quiet:
    print(f"converting {model} into {out} (once)", file=sys.stderr)
  return convert(model, out, progress=not quiet and sys.stderr.isatty())


# --- prompts -> ids --------------------------------------------------------------------------------


def _encode(prompts: list[str], tokenizer, vocab_size: int, chat: bool = False) -> list:
  """Token ids (int lists, special tokens added by the tokenizer) of each prompt; ids as text without
  one. chat: each prompt as a user turn of the tokenizer's chat template, ready for the assistant's."""
  if chat and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
    raise UsageError("--chat needs a tokenizer with a chat template; this checkpoint's tokenizer has none")
  out = []
  for text in prompts:
    if chat:
      ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
      ids = [int(t) for t in ids]
    elif tokenizer is not None:
      ids = list(tokenizer(text)["input_ids"])
    else:
      try:
        ids = [int(t) for t in text.split()]
      except ValueError:
        raise UsageError("this checkpoint has no tokenizer: give the prompt as space-separated token ids, "
                         f"got {text[:40]!r}") from None
      if any(not 0 <= t < vocab_size for t in ids):
        raise UsageError(f"token ids must be in [0, {vocab_size}), got {text[:40]!r}")
    if not ids:
      raise UsageError(f"prompt {text[:40]!r} has no tokens")
    out.append(ids)
  return out


def _pad(batch: list, pad_id: int):
  import numpy as np

  width = max(len(ids) for ids in batch)
  ids = np.full((len(batch), width), pad_id, np.int32)
  mask = np.zeros((len(batch), width), bool)
  for i, row in enumerate(batch):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask


def _until_eos(row, eos_ids) -> list[int]:
  """Generated ids up to and including the first EOS."""
  out = []
  for t in row:
    t = int(t)
    out.append(t)
    if t in eos_ids:
      break
  return out


def _text(ids: list[int], tokenizer) -> str:
  if tokenizer is None:
    return " ".join(str(t) for t in ids)
  return tokenizer.decode(ids, skip_special_tokens=True)


class _Streamer:
  """Prints a single row's new text as tokens arrive (decoding the whole prefix each time)."""

  def __init__(self, tokenizer, eos_ids, out):
    self.tokenizer, self.eos_ids, self.out = tokenizer, eos_ids, out
    self.ids: list[int] = []
    self.printed = ""
    self.done = False
    self.first_token_at = None

  def __call__(self, step, tokens):
    if self.first_token_at is None:
      self.first_token_at = time.perf_counter()
    if self.out is None or self.done:
      return
    t = int(tokens[0])
    self.ids.append(t)
    self.done = t in self.eos_ids
    if self.tokenizer is None:
      self.out.write(("" if len(self.ids) == 1 else " ") + str(t))
    else:
      text = _text(self.ids, self.tokenizer)
      # A later piece can change how earlier ones decode; print only once the prefix is stable again.
      if text.startswith(self.printed):
        self.out.write(text[len(self.printed):])
        self.printed = text
    self.out.flush()


# --- statistics ------------------------------------------------------------------------------------


def _peak_memory():
  """Peak device bytes in use, or None where the backend does not say (the CPU)."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def _stats(model, *, tokens: int, seconds: float, prefill_s: float | None, decode_tokens: int,
           decode_s: float) -> dict:
  """Run statistics. tokens_per_s: decode throughput, the tokens after each row's first over the time
  after the first token (the first includes the prefill, and compiles on a first call); without such
  tokens, all tokens over the whole generate time."""
  if decode_tokens > 0 and decode_s > 0:
    tokens_per_s = decode_tokens / decode_s
  else:
    tokens_per_s = tokens / seconds if seconds > 0 else None
  summary = model.stats.summary() if model.stats is not None else {}
  plan = model.plan
  return {
      "generated_tokens": tokens,
      "generate_s": seconds,
      "tokens_per_s": tokens_per_s,
      "prefill_s": prefill_s,
      "peak_device_bytes": _peak_memory(),
      "plan_bytes": None if plan is None else int(plan.breakdown.total),
      "budget_bytes": None if plan is None or plan.budget_bytes is None else int(plan.budget_bytes),
      "slots_per_layer": None if plan is None else list(plan.slots_per_layer),
      "policy": model.policy,
      **{k: summary[k] for k in ("redirect_rate", "hits", "misses", "hit_rate", "experts_swapped",
                                 "bytes_swapped") if k in summary},
  }


def _stats_line(s: dict) -> str:
  from swapmoe_jax.serving.budget import format_bytes

  tps = "n/a" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"
  prefill = "n/a" if s["prefill_s"] is None else f"{1e3 * s['prefill_s']:.0f} ms"
  peak = "n/a on CPU" if s["peak_device_bytes"] is None else format_bytes(s["peak_device_bytes"])
  plan = "plan n/a" if s["plan_bytes"] is None else f"plan {format_bytes(s['plan_bytes'])}"
  budget = ", no budget" if s["budget_bytes"] is None else f" of budget {format_bytes(s['budget_bytes'])}"
  parts = [f"{s['generated_tokens']} tokens, {tps} tokens/s (decode)", f"prefill {prefill} (time to first token)",
           f"peak device memory {peak} ({plan}{budget})", f"policy {s['policy']}"]
  if "redirect_rate" in s:
    looked = s["hits"] + s["misses"]
    parts.append(f"redirected {100 * s['redirect_rate']:.2f}%, hits {s['hits']}/{looked} misses {s['misses']}")
    parts.append(f"swapped {s['experts_swapped']} experts ({format_bytes(s['bytes_swapped'])})")
  return "stats: " + " | ".join(parts)


# --- main ------------------------------------------------------------------------------------------


def _progress(args) -> bool:
  """Progress bars only for a person watching: not with --quiet, not when stderr is a file or pipe."""
  return not args.quiet and sys.stderr.isatty()


def _run(args) -> int:
  from swapmoe_jax import checkpoint as ckpt
  from swapmoe_jax.serving import budget as budget_lib
  from swapmoe_jax.serving import loader

  _check_args(args)
  prompts = _read_prompts(args)
  if args.budget is not None:
    budget_lib.parse_budget(args.budget)  # malformed budgets fail before anything is loaded
  folder = resolve_model(args.model, quiet=args.quiet)
  meta = ckpt.read_metadata(folder)
  tokenizer = loader._tokenizer(meta)  # noqa: SLF001 - the same tokenizer `load` attaches
  cfg = meta.config
  if args.chat and cfg.is_encoder_decoder:
    raise UsageError("--chat is for decoder-only chat models; this checkpoint is a Switch Transformer")
  encoded = _encode(prompts, tokenizer, cfg.vocab_size, chat=args.chat)
  for text, ids in zip(prompts, encoded):
    if len(ids) > args.max_source_len:
      raise UsageError(f"prompt {text[:40]!r} is {len(ids)} tokens long, above --max-source-len "
                       f"{args.max_source_len}")
  calibration = None
  if args.planner == "calibrated":
    import numpy as np
    calibration = [np.asarray(ids, np.int32) for ids in encoded]
  if args.experts is not None and args.experts > cfg.num_experts:
    raise UsageError(f"--experts {args.experts}: this model has {cfg.num_experts} experts per MoE layer")
  model = loader.load(folder, budget=args.budget, experts=args.experts, policy=args.policy, planner=args.planner,
                      gate_mode=args.gate, dtype=args.dtype, max_batch_size=args.batch_size,
                      max_source_len=args.max_source_len, max_new_tokens=args.max_new_tokens,
                      calibration_inputs=calibration, progress=_progress(args), staging=args.staging,
                      selective_threshold=args.selective_threshold)
  tokenizer = model.tokenizer if model.tokenizer is not None else tokenizer
  eos_ids = set(int(t) for t in cfg.eos_token_ids)
  stdout = sys.stdout
  outputs, out_ids = [], []
  tokens = decode_tokens = 0
  seconds = decode_s = 0.0
  prefill_s = None
  for start in range(0, len(encoded), args.batch_size):
    batch = encoded[start:start + args.batch_size]
    ids, mask = _pad(batch, cfg.pad_token_id)
    streamer = _Streamer(tokenizer, eos_ids, stdout if (len(batch) == 1 and not args.json) else None)
    t0 = time.perf_counter()
    gen = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=streamer)
    t1 = time.perf_counter()
    seconds += t1 - t0
    if streamer.first_token_at is not None:
      if prefill_s is None:
        prefill_s = streamer.first_token_at - t0
      decode_s += t1 - streamer.first_token_at
    for row in gen:
      row_ids = _until_eos(row, eos_ids)
      tokens += len(row_ids)
      decode_tokens += len(row_ids) - 1
      out_ids.append(row_ids)
      outputs.append(_text(row_ids, tokenizer))
      if not args.json and len(batch) > 1:
        stdout.write(outputs[-1] + "\n")
    if not args.json and len(batch) == 1:
      stdout.write("\n")
    stdout.flush()
  stats = _stats(model, tokens=tokens, seconds=seconds, prefill_s=prefill_s, decode_tokens=decode_tokens,
                 decode_s=decode_s)
  if args.json:
    json.dump({"model": folder, "prompts": prompts, "prompt_ids": encoded, "outputs": outputs,
               "token_ids": out_ids, "stats": stats}, stdout)
    stdout.write("\n")
    stdout.flush()
  elif not args.quiet:
    print(_stats_line(stats), file=sys.stderr)
  return 0


def _planner(text: str):
  """--planner: a planner's name, or K per MoE layer as comma-separated ints."""
  if text in ("auto", "uniform", "calibrated"):
    return text
  try:
    slots = tuple(int(k) for k in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: choose auto, uniform, calibrated, or K per MoE layer "
                                     "as comma-separated ints (e.g. 6,6,4,4)") from None
  if any(k < 1 for k in slots):
    raise argparse.ArgumentTypeError(f"{text!r}: each K must be a positive int")
  return slots


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; `argv` None means the process's own arguments.

  Returns:
    The exit status: 0 on success, 2 on bad input (one `error: ...` line on stderr), 130 if interrupted.
  """
  from checkpoints_conv.errors import ConversionError
  from swapmoe_jax.builtin.demo import DemoUnavailableError

  try:
    args = _parser().parse_args(argv)
  except UsageError as e:
    return _fail(e)
  except SystemExit as e:  # --help
    return e.code if isinstance(e.code, int) else 0
  try:
    return _run(args)
  except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
    _silence_stdout()
    return 141
  except (ValueError, OSError, ConversionError, DemoUnavailableError) as e:
    return _fail(e)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


def _silence_stdout() -> None:
  """Points stdout at /dev/null, so that the interpreter's final flush does not raise again."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
  except (OSError, ValueError, AttributeError):  # a replaced sys.stdout (tests) has no real descriptor
    pass


def _fail(e: BaseException) -> int:
  message = " ".join(str(e).split()) or type(e).__name__
  print(f"error: {message}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
