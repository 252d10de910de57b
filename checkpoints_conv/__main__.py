"""Command line: `python -m checkpoints_conv --hf <folder or hub id> [--out] <folder>`.

Exit status 0 on success, 2 on a conversion error (one `error: ...` line on stderr), 130 when
interrupted; nothing is left on disk after a failure.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m checkpoints_conv",
      description="Convert a Hugging Face SwitchTransformers, Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint "
                  "into swapmoe_jax's Orbax layout.")
  p.add_argument("--hf", required=True, metavar="SOURCE",
                 help="local folder with config.json and weights, or a hub id such as google/switch-base-8")
  p.add_argument("--out", metavar="FOLDER", help="folder to write (must not exist); may also be given positionally")
  p.add_argument("out_folder", nargs="?", metavar="OUT", help="the folder to write, instead of --out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of the stored weights (default: float32)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint at --out")
  p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
  return p


def main(argv: list[str] | None = None) -> int:
  """Runs the converter; `argv` None means the process's own command line.

  Returns:
    The exit status.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  if (args.out is None) == (args.out_folder is None):
    parser.error("give the output folder once: --out FOLDER or FOLDER")
  args.out = args.out or args.out_folder
  # Conversion needs no accelerator, but Orbax initialises a JAX backend: on the command line, pin
  # it to the CPU so that a GPU is neither claimed nor preallocated. (Not when called with `argv`
  # from a Python process, whose JAX platforms are its own business.) jax is already imported by
  # then, so setting the environment variable would come too late.
  if argv is None and "JAX_PLATFORMS" not in os.environ:
    import jax

    jax.config.update("jax_platforms", "cpu")
  from checkpoints_conv.convert import convert
  from checkpoints_conv.errors import ConversionError
  from swapmoe_jax.checkpoint import CheckpointError, read_metadata

  try:
    out = convert(args.hf, args.out, dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite)
  except (ConversionError, CheckpointError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted; nothing was written", file=sys.stderr)
    return 130
  if not args.quiet:
    cfg = read_metadata(out).config
    print(f"wrote {out}: {cfg.num_moe_layers} MoE layers of {cfg.num_experts} experts, {args.dtype}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
