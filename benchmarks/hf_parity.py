"""float32 parity with Hugging Face on an accelerator: HF PyTorch `full` against this project's `full`.

  python benchmarks/hf_parity.py --shape switch-base-8 --requests 4     # on a GPU machine

Builds an HF `SwitchTransformersForConditionalGeneration` of the shape with Hugging Face's own
initialisation (every expert distinct), `save_pretrained`, converts it with `checkpoints_conv`, loads it
with `swapmoe_jax.load` (float32, every expert resident), and compares, on random prompts:
  * teacher-forced logits: max |Δ| and max |Δ| relative to the largest |logit| of HF;
  * greedy tokens of `generate` (HF on its device, ours on JAX's default device).
With `--precision default` the engine's float32 programs are traced at JAX's default matmul precision
instead of "highest" (what the engine used before): TF32 on recent NVIDIA GPUs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default="switch-base-8")
  p.add_argument("--requests", type=int, default=4)
  p.add_argument("--src-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--precision", nargs="+", choices=("engine", "default"), default=["engine", "default"],
                 help="engine: what `load` does (float32 at 'highest'); default: JAX's default precision "
                      "(both, by default, on the same model and prompts)")
  p.add_argument("--hf-device", choices=("auto", "cpu"), default="auto",
                 help="where HF runs: its accelerator when torch sees one (auto), or the CPU (exact float32)")
  p.add_argument("--out", help="append the JSON line to this file")
  args = p.parse_args(argv)

  import jax
  import torch

  import peers
  import swapmoe_jax
  from checkpoints_conv import convert
  from shapes import SHAPES
  from swapmoe_jax.serving import decode

  cfg = SHAPES[args.shape]
  dev = "cuda" if torch.cuda.is_available() and args.hf_device == "auto" else "cpu"
  t0 = time.perf_counter()
  torch.manual_seed(0)
  import transformers

  hf = transformers.SwitchTransformersForConditionalGeneration(peers.hf_config(cfg)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(os.path.join(tmp, "hf"))
    folder = convert(os.path.join(tmp, "hf"), os.path.join(tmp, "conv"), dtype="float32", progress=False)
    ours = swapmoe_jax.load(folder, dtype="float32", max_source_len=args.src_len, max_new_tokens=args.new_tokens)
  hf = hf.to(dev)
  setup_s = time.perf_counter() - t0
  engine_graphdef = ours._graphdef  # noqa: SLF001
  for precision in args.precision:
    ours._graphdef = engine_graphdef if precision == "engine" else decode.Static(ours.graphdef)  # noqa: SLF001
    rng = np.random.default_rng(0)
    diffs, rel, equal, flips = [], [], 0, 0
    for _ in range(args.requests):
      ids = rng.integers(2, cfg.vocab_size, (1, args.src_len)).astype(np.int64)
      dec = np.concatenate([np.zeros((1, 1), np.int64), rng.integers(2, cfg.vocab_size, (1, 15))], axis=1)
      with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids, device=dev), decoder_input_ids=torch.as_tensor(dec, device=dev)
                 ).logits.float().cpu().numpy()
        want = hf.generate(input_ids=torch.as_tensor(ids, device=dev), max_new_tokens=args.new_tokens,
                           do_sample=False).cpu().numpy()[0, 1:]
      got = np.asarray(ours(ids.astype(np.int32), None, dec.astype(np.int32)))
      diffs.append(float(np.abs(got - ref).max()))
      rel.append(diffs[-1] / float(np.abs(ref).max()))
      flips += int(np.sum(got.argmax(-1) != ref.argmax(-1)))
      out = ours.generate(ids.astype(np.int32), max_new_tokens=args.new_tokens)[0]
      n = min(len(out), len(want))
      equal += int(len(out) == len(want) and np.array_equal(out[:n], want[:n]))
    row = dict(script="hf_parity", shape=args.shape, precision=precision, requests=args.requests,
               src_len=args.src_len, new_tokens=args.new_tokens, max_abs_logit_diff=max(diffs),
               max_rel_logit_diff=max(rel), argmax_flips=flips, greedy_requests_equal=equal,
               device=jax.devices()[0].device_kind, torch_device=dev, setup_s=round(setup_s, 1),
               torch_tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32,
                               float32_matmul_precision=torch.get_float32_matmul_precision()),
               versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__))
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
