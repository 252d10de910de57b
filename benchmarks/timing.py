"""Per-request figures, as a user sees them, for this project's policies and the HF peers alike.

Each repeat runs two whole requests of `new_tokens` tokens from fresh prompts:
  plain     `generate` without streaming, timed from the call to its return: the whole-request
            latency, and `ms_per_token` = that latency / the tokens generated;
  streamed  `generate` with a per-token callback stamping when each token reaches the host:
            time to first token (`ttft_ms`, from the call), and the device-call boundaries — the
            stamps at which a call's tokens arrive (every token for HF, every `steps_per_call`-th
            for ours). `decode_ms_per_token` = (last boundary - first boundary) / the tokens between
            them: whole device calls only, never a difference of two requests of different lengths.
            `stream_p50_ms` / `stream_p95_ms`: per-token time of each call (boundary gap / tokens).
            `first_alone`: the first token comes from a call of its own (a decoder-only model's
            prefill, `CausalLM.generate`), the next calls bring `chunk` tokens each; that first
            boundary counts for the time to first token only, never for the decode figures.
Figures are medians over the repeats (stream percentiles over every call of every repeat).
"""

from __future__ import annotations

import time

import numpy as np


class Stamps:
  """Arrival times of a streamed request's tokens (in order) and the request's start."""

  def __init__(self):
    self.start = time.perf_counter()
    self.times: list[float] = []

  def token(self) -> None:
    self.times.append(time.perf_counter())


def boundaries(times, chunk: int, first_alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(arrival time of each device call's tokens, the token index at which each call's tokens start).
  `first_alone`: token 0 is a call of its own, then calls of `chunk` from token 1."""
  idx = np.arange(0, len(times), chunk) if not first_alone else np.arange(1, len(times), chunk)
  return np.asarray(times)[idx], idx


def per_request(plain_s: list[float], streams: list[Stamps], new_tokens: int, chunk: int, batch: int,
                first_alone: bool = False) -> dict:
  """The figures of the module docstring from `plain_s` (whole-request seconds) and streamed stamps
  (`first_alone`: see the module docstring)."""
  ttft, decode, gaps = [], [], []
  for s in streams:
    if len(s.times) != new_tokens:
      raise ValueError(f"a streamed request gave {len(s.times)} tokens, expected {new_tokens}")
    t, idx = boundaries(s.times, chunk, first_alone)
    ttft.append(s.times[0] - s.start)
    if len(t) > 1:
      decode.append((t[-1] - t[0]) / (idx[-1] - idx[0]))
      gaps.extend(np.diff(t) / np.diff(idx))
  request = float(np.median(plain_s))
  out = {"timing": "per-request", "request_ms": 1e3 * request, "ms_per_token": 1e3 * request / new_tokens,
         "ttft_ms": 1e3 * float(np.median(ttft)), "tokens_per_s": batch * new_tokens / request,
         "decode_ms_per_token": 1e3 * float(np.median(decode)) if decode else None,
         "stream_p50_ms": 1e3 * float(np.median(gaps)) if gaps else None,
         "stream_p95_ms": 1e3 * float(np.percentile(gaps, 95)) if gaps else None}
  out["prefill_ms"] = out["ttft_ms"]  # kept for report.py's tables: the first token's wait
  return out
