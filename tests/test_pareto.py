"""`eval.pareto`: exact match against the share of tokens read from host memory, merged from reports."""

from __future__ import annotations

import json

from swapmoe_jax.eval import pareto


def _row(policy, k, em, bank=None, threshold=None, stream="runs"):
  r = dict(stream=stream, policy=policy, slots=k, exact_match=em, bank_rate=bank, requests=10)
  if threshold is not None:
    r["threshold"] = threshold
  return r


def test_points_put_masked_policies_at_zero_and_sort_by_host_reads():
  rows = [_row("full", 16, 0.99), _row("swapmoe", 3, 0.8, 0.0), _row("lfu", 3, 0.99, 0.4),
          _row("selective", 3, 0.95, 0.05, 0.5), _row("selective", 3, 0.99, 0.15, 0.1),
          _row("selective", 3, 0.95, 0.05, 0.5),  # the same point from a second report: kept once
          _row("pruned", 3, 0.4, None), _row("swapmoe", 3, 0.1, 0.0, stream="shuffled")]
  assert pareto.points(rows, "runs") == {3: [("pruned", 0.0, 0.4), ("swapmoe", 0.0, 0.8),
                                             ("selective 0.5", 0.05, 0.95), ("selective 0.1", 0.15, 0.99),
                                             ("lfu", 0.4, 0.99)]}


def test_main_merges_reports_and_refuses_different_requests(tmp_path, capsys):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps({"rows": [_row("full", 16, 0.99), _row("swapmoe", 3, 0.8, 0.0)]}))
  b.write_text(json.dumps({"rows": [_row("full", 16, 0.99), _row("selective", 3, 0.9, 0.1, 0.3)]}))
  assert pareto.main([str(a), str(b), "--out", str(tmp_path / "p.png")]) == 0
  out = capsys.readouterr().out
  assert "| 3 | selective 0.3 | 10.0% | 90.0% |" in out and "| 3 | swapmoe | 0.0% | 80.0% |" in out
  b.write_text(json.dumps({"rows": [_row("full", 16, 0.5)]}))
  assert pareto.main([str(a), str(b), "--out", str(tmp_path / "p.png")]) == 2
  assert "not the same requests" in capsys.readouterr().err


def test_cost_ms_is_ms_per_token_over_full_and_needs_full(tmp_path, capsys):
  rows = [_row("full", 16, 0.99) | {"ms_per_token": 2.0}, _row("swapmoe", 3, 0.8, 0.0) | {"ms_per_token": 3.0},
          _row("selective", 3, 0.97, 0.1, 0.5) | {"ms_per_token": 2.5}]
  assert pareto.points(rows, "runs", "ms") == {3: [("selective 0.5", 1.25, 0.97), ("swapmoe", 1.5, 0.8)]}
  a = tmp_path / "a.json"
  a.write_text(json.dumps({"rows": rows}))
  assert pareto.main([str(a), "--cost", "ms", "--out", str(tmp_path / "p.png")]) == 0
  assert "| 3 | swapmoe | 1.50x | 80.0% |" in capsys.readouterr().out
  a.write_text(json.dumps({"rows": rows[1:]}))  # no full row: nothing to compare with
  assert pareto.main([str(a), "--cost", "ms", "--out", str(tmp_path / "p.png")]) == 2
  assert "needs a full row" in capsys.readouterr().err
