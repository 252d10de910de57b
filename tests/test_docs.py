"""The README's code runs and its CLI reference is the parser's help.

`python tests/test_docs.py` rewrites the README's CLI reference from the parser (after changing a flag).
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TESTED = "<!-- tested: tests/test_docs.py -->"
CLI_MARK = "<!-- cli-help:"
HELP_COLUMNS = "100"


def _readme() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def _tested_blocks(text: str) -> list[str]:
  """The ```python blocks that directly follow the TESTED marker."""
  return re.findall(re.escape(TESTED) + r"\n```python\n(.*?)\n```", text, flags=re.S)


def _help_block_span(text: str) -> tuple[int, int]:
  """Start and end offsets of the help text inside the ```text block after the CLI marker."""
  mark = text.index(CLI_MARK)
  start = text.index("```text\n", mark) + len("```text\n")
  return start, text.index("\n```", start)


def cli_help() -> str:
  """The parser's help at a fixed width, without trailing spaces."""
  os.environ["COLUMNS"] = HELP_COLUMNS  # argparse wraps to the terminal width
  os.environ["NO_COLOR"] = "1"
  from swapmoe_jax import generate

  return "\n".join(line.rstrip() for line in generate._parser().format_help().rstrip().splitlines())  # noqa: SLF001


def test_readme_python_examples_run():
  blocks = _tested_blocks(_readme())
  assert blocks, f"no ```python block follows {TESTED!r} in README.md"
  for code in blocks:  # each asserts its own results (outputs against a reference computed in the block)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102


def test_readme_cli_reference_is_the_parsers_help(monkeypatch):
  monkeypatch.setenv("COLUMNS", HELP_COLUMNS)
  text = _readme()
  start, end = _help_block_span(text)
  assert text[start:end] == cli_help(), "README's CLI reference is stale: run `python tests/test_docs.py`"


def test_every_flag_is_in_the_readme_reference():
  """A second, width-independent check: each option string of the parser appears in the reference."""
  from swapmoe_jax import generate

  text = _readme()
  start, end = _help_block_span(text)
  flags = {s for a in generate._parser()._actions for s in a.option_strings}  # noqa: SLF001
  assert {"--model", "--budget", "--policy", "--json"} <= flags
  assert sorted(f for f in flags if not re.search(re.escape(f) + r"\b", text[start:end])) == []


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  text = _readme()
  start, end = _help_block_span(text)
  with open(README, "w", encoding="utf-8") as f:
    f.write(text[:start] + cli_help() + text[end:])
  print("README.md: CLI reference rewritten from the parser")
