"""Requests for the evaluations, and the loop that runs them in order through a loaded model.

A request is a prompt and its expected answer as token arrays padded to few shapes (one compile per
shape, not per prompt length). `run_stream` generates them in arrival order, as a server would see
them, so that swap controllers adapt across requests; both the accuracy grid (`evaluate`) and the
Rouge sweep (`samsum`) use it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from swapmoe_jax.serving.sampling import tokens_until_eos


@dataclasses.dataclass
class Request:
  """One request. Shapes: S the padded source length, T the padded answer length."""

  prompt: str
  answer: str
  ids: np.ndarray  # int32 [1, S]
  mask: np.ndarray  # bool [1, S]
  target: np.ndarray  # int32 [1, T]: the answer's ids then EOS, padded
  target_mask: np.ndarray  # bool [1, T]


def make_requests(tokenizer, pairs: Iterable[tuple[str, str]], *, src_len: int, tgt_len: int,
                  bucket: int | None = None) -> list[Request]:
  """Requests from (prompt, answer) pairs.

  Prompts longer than `src_len` tokens are truncated (their EOS kept). Each is padded to `src_len`, or
  with `bucket` to the next multiple of `bucket` tokens (at most `src_len`): fewer pad tokens for short
  prompts, still only a few shapes.
  """
  out = []
  for prompt, answer in pairs:
    ids = tokenizer(prompt, truncation=True, max_length=src_len)["input_ids"]
    width = src_len if bucket is None else min(src_len, -(-len(ids) // bucket) * bucket)
    src = np.full((1, width), tokenizer.pad_token_id or 0, np.int32)
    src[0, :len(ids)] = ids
    tgt = tokenizer(answer, padding="max_length", max_length=tgt_len, truncation=True, return_tensors="np")
    mask = np.zeros((1, width), bool)
    mask[0, :len(ids)] = True
    out.append(Request(prompt, answer, src, mask, tgt["input_ids"].astype(np.int32),
                       tgt["attention_mask"].astype(bool)))
  return out


def _batch(requests: Sequence[Request], rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """The requests' sources as one batch of `rows` rows, as wide as the widest; rows past the requests
  are filler (one pad token), whose outputs the caller drops."""
  width = max(r.ids.shape[1] for r in requests)
  ids = np.full((rows, width), pad_id, np.int32)
  mask = np.zeros((rows, width), bool)
  for row, r in enumerate(requests):
    ids[row, :r.ids.shape[1]] = r.ids[0]
    mask[row, :r.ids.shape[1]] = r.mask[0]
  mask[len(requests):, 0] = True
  return ids, mask


def run_stream(model, requests: Sequence[Request], *, max_new_tokens: int, batch_size: int = 1,
               timed_from: int = 1, before_batch: Callable[[int, int], None] | None = None,
               after_batch: Callable[[int, int], None] | None = None) -> dict:
  """Generates the requests in order, `batch_size` at a time (greedy, as `model` samples).

  Args:
    model: a loaded `SwitchModel`.
    requests: from `make_requests`.
    timed_from: the first batch that counts in `ms_per_token` (default 1: the first batch compiles).
    before_batch, after_batch: optional callables (start, stop) of a batch's requests `[start, stop)`,
      called before it is generated and after it returned, outside the timed part (e.g. to set the
      resident experts, or read the routing statistics, between requests).

  Returns a dict: `outputs` (int32 [N] per request, the new tokens as `generate` returns them, padded
  after EOS), `tokens` (generated tokens of every request, each up to and including its EOS), and
  `ms_per_token` (wall time of the timed batches over their tokens).
  """
  eos = model.config.eos_token_ids
  outputs, tokens, timed_tokens, seconds = [], 0, 0, 0.0
  for n, start in enumerate(range(0, len(requests), batch_size)):
    part = requests[start:start + batch_size]
    ids, mask = _batch(part, batch_size, model.config.pad_token_id)
    if before_batch is not None:
      before_batch(start, start + len(part))
    t0 = time.perf_counter()
    out = np.asarray(model.generate(ids, mask, max_new_tokens=max_new_tokens))[:len(part)]
    dt = time.perf_counter() - t0
    if after_batch is not None:
      after_batch(start, start + len(part))
    counts = sum(tokens_until_eos(row, eos) for row in out)
    tokens += counts
    if n >= timed_from:
      seconds += dt
      timed_tokens += counts
    outputs.extend(out)
  return dict(outputs=outputs, tokens=tokens, ms_per_token=1e3 * seconds / max(timed_tokens, 1))
