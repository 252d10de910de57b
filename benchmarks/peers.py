"""The Hugging Face peers, measured the way `bench_decode.py` measures this project's policies.

  hf          `SwitchTransformersForConditionalGeneration.generate`, the whole model on the GPU;
  accelerate  the same model dispatched by HF accelerate with `max_memory={0: budget}`: what does not
              fit the budget stays in CPU memory and is copied to the GPU layer by layer at every
              forward (accelerate's CPU offload).

`bench_decode.py --runs hf:none accelerate:33%` runs them, each in its own process, next to the JAX
policies. Random weights of the released shapes, in bfloat16 or float32, greedy decoding forced to
emit exactly `--new-tokens` tokens (`min_new_tokens`). Needs torch with CUDA and accelerate (not
dependencies of this project: the GPU image has them).
"""

from __future__ import annotations

import time

import numpy as np

PEERS = ("hf", "accelerate")


def hf_config(cfg):
  """The `SwitchTransformersConfig` of a `SwitchConfig` shape."""
  import transformers

  return transformers.SwitchTransformersConfig(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
      num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_experts=cfg.num_experts,
      num_sparse_encoder_layers=cfg.num_layers // cfg.encoder_sparse_step,
      num_sparse_decoder_layers=cfg.num_decoder_layers // cfg.decoder_sparse_step,
      expert_capacity=cfg.expert_capacity, decoder_start_token_id=cfg.decoder_start_token_id,
      pad_token_id=cfg.pad_token_id, eos_token_id=1, dropout_rate=0.0)


class _Streamer:
  """A `generate` streamer stamping each new token's arrival (`timing.Stamps`); HF's first `put` is the
  decoder start token, not a generated one."""

  def __init__(self, stamps):
    self.stamps, self.seen = stamps, 0

  def put(self, value):
    import torch

    if torch.cuda.is_available():
      torch.cuda.synchronize()
    if self.seen:
      self.stamps.token()
    self.seen += 1

  def end(self):
    pass


def run_peer(peer: str, budget: str, cfg, dtype: str, batch: int, src_len: int, new_tokens: int, repeats: int,
             full_model_bytes: int) -> dict:
  """One peer at one budget ('none' for `hf`), in this process. Returns a row like `bench_decode.run_one`'s,
  with the per-request figures of `timing.py` (HF's `generate` streams each token: calls of one step)."""
  import torch
  import transformers

  from swapmoe_jax.serving import budget as budget_lib

  if peer not in PEERS:
    raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")
  if not torch.cuda.is_available():
    raise RuntimeError("the peers are measured on a CUDA GPU; torch sees none")
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device("cuda"):  # random initialisation on the GPU: seconds instead of minutes on the CPU
    model = transformers.SwitchTransformersForConditionalGeneration._from_config(hf_config(cfg), dtype=tdtype)
  model.eval()
  budget_bytes = None
  if peer == "accelerate":
    import accelerate

    budget_bytes = budget_lib.parse_budget(budget).resolve(full_model_bytes)
    model.to("cpu")
    torch.cuda.empty_cache()
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={0: budget_bytes, "cpu": 2**40},
        no_split_module_classes=["SwitchTransformersBlock"], dtype=tdtype)
    model = accelerate.dispatch_model(model, device_map=device_map, main_device=0)
  setup_s = time.perf_counter() - t0
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  rng = np.random.default_rng(1)

  def gen(n, streamer=None):
    ids = torch.as_tensor(rng.integers(2, cfg.vocab_size, (batch, src_len)), device="cuda")
    with torch.no_grad():
      out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
    torch.cuda.synchronize()
    return out

  import timing

  gen(2)  # warm-up
  plain, streams = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    gen(new_tokens)
    plain.append(time.perf_counter() - t)
    stamps = timing.Stamps()
    gen(new_tokens, _Streamer(stamps))
    streams.append(stamps)
  figures = timing.per_request(plain, streams, new_tokens, 1, batch)
  return {
      "shape": None, "dtype": dtype, "policy": peer, "budget": budget, "batch": batch, "src_len": src_len,
      "new_tokens": new_tokens, "slots_per_layer": None, "budget_bytes": budget_bytes, "planned_bytes": None,
      "full_model_bytes": full_model_bytes, "peak_device_bytes": int(torch.cuda.max_memory_allocated()),
      **figures, "setup_s": setup_s,
      "device": torch.cuda.get_device_name(0), "platform": "cuda", "devices": 1,
      "versions_peer": {"torch": torch.__version__, "transformers": transformers.__version__},
  }
