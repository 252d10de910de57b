"""Every notebook in colab/ runs top to bottom in its small mode: on the CPU, offline, through nbclient."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(name for name in os.listdir(COLAB) if name.endswith(".ipynb"))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """What the kernels inherit: this checkout's package, the CPU, no hub, one model cache and one
  persistent XLA cache for the module (every point of a sweep loads the model anew)."""
  root = tmp_path_factory.mktemp("notebooks")
  return {
      "SWAPMOE_NOTEBOOK_MODE": "small", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
      "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
      "SWAPMOE_CACHE": str(root / "swapmoe-cache"), "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def _run(name: str, env: dict, monkeypatch, cwd) -> list[str]:
  """Executes the notebook (nbclient raises CellExecutionError on the first failing cell); returns each
  code cell's text output."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "a code cell did not run"
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  return ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in code]


def test_the_issue_notebooks_are_here():
  assert {"quickstart.ipynb", "samsum_switch.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_small_mode(name, kernel_env, monkeypatch, tmp_path):
  text = "\n".join(_run(name, kernel_env, monkeypatch, tmp_path))
  assert "JAX backend: cpu" in text and "mode: small (offline)" in text
  if name == "quickstart.ipynb":
    assert "skipped: MODE is small" in text and "redirected" in text  # the telemetry printed
  if name == "samsum_switch.ipynb":  # the table: a header, then full and one row per policy at K=2
    table = text[re.search(r"^ *policy +budget", text, re.M).start():].splitlines()
    assert [line.split()[0] for line in table[1:5]] == ["full", "swapmoe", "pruned", "lru"]
    assert "exact policies equal full: True" in text
  if name == "budget_sweep.ipynb":  # the evaluation table, and the exact policy's check
    assert "7 rows: full, lfu, pruned, swapmoe" in text  # full + 2 budgets x 3 policies
    assert "lfu at 4/16 experts: agreement with full 100.0%" in text
