"""`benchmarks/profile_prefill.py`'s trace summaries, on a Perfetto trace written here: per kernel name,
per GPU stream, and the time in which some stream was busy (how RESULTS.md's traced requests are read)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def profile_prefill():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import profile_prefill as module
  finally:
    sys.path.remove(os.path.join(REPO, "benchmarks"))
  return module


def _trace(path, events):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "Stream #9(Compute)"}}]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def _x(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_streams_are_summed_apart_and_overlaps_count_once(tmp_path, profile_prefill):
  path = str(tmp_path / "t.json.gz")
  # stream 7: two decode kernels, 0-1000 us and 1500-2500 us; stream 9: a gather at 800-1700 us
  # (overlapping both) and a write at 4000-4100 us; a host event that must not count.
  _trace(path, [_x(1, 7, "decode", 0, 1000), _x(1, 7, "decode", 1500, 1000), _x(1, 9, "gather", 800, 900),
                _x(1, 9, "write", 4000, 100), _x(2, 3, "python", 0, 9000)])
  s = profile_prefill.summarize_streams(path, top=1)
  assert s["span_ms"] == pytest.approx(4.1)
  assert s["busy_ms"] == pytest.approx(2.6)  # 0-2500 once, then 4000-4100
  assert [(x["stream"], x["events"]) for x in s["streams"]] == [("Stream #7(Compute)", 2), ("Stream #9(Compute)", 2)]
  assert [x["ms"] for x in s["streams"]] == pytest.approx([2.0, 1.0])
  assert s["streams"][1]["top"] == [("gather", pytest.approx(0.9), 1)]
  rows = profile_prefill.summarize(path, top=0)
  assert [(n, c) for n, _, c in rows] == [("decode", 2), ("gather", 1), ("write", 1)]


def test_a_trace_without_gpu_events_has_no_streams(tmp_path, profile_prefill):
  path = str(tmp_path / "t.json.gz")
  _trace(path, [_x(2, 3, "python", 0, 9000)])
  assert profile_prefill.summarize_streams(path) == {"span_ms": 0.0, "busy_ms": 0.0, "streams": []}
