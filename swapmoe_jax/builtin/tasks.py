"""The synthetic text-to-text tasks of the built-in default model, generated in code, checked exactly.

Ten task families with T5-style prefixes (`sort: 5 2 9` -> `2 5 9`). Every answer is a function of
its prompt, so exact match is a sound metric. Prompts are split into a training space and a held-out
space by a stable hash of the prompt text (`is_held_out`): the training script never sees a held-out
prompt, and evaluation uses held-out prompts only.

Request streams for evaluation (`request_stream`): "runs" (tasks arrive in runs, as in a user's
session: several requests of one family, then another) and "shuffled" (families interleaved).
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable

WORDS = (
    "cat", "dog", "sun", "map", "red", "blue", "tree", "fish", "book", "milk", "star", "moon", "rain",
    "snow", "bird", "frog", "lamp", "door", "cake", "ring", "ship", "rock", "leaf", "wind", "fire",
    "gold", "salt", "king", "road", "hill", "bell", "coat", "drum", "egg", "fox", "hat", "ice", "jam",
    "kite", "owl",
)
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("h", "min", 60))
HELD_OUT_FRACTION = 10  # one prompt in 10 (by hash) is held out


@dataclasses.dataclass(frozen=True)
class Example:
  """One request: its task family, the prompt (with prefix) and the exact expected answer."""

  family: str
  prompt: str
  answer: str


def _words(rng, lo, hi):
  return rng.choices(WORDS, k=rng.randint(lo, hi))


def _numbers(rng, lo, hi, top=100):
  return [rng.randrange(top) for _ in range(rng.randint(lo, hi))]


def _join(xs):
  return " ".join(str(x) for x in xs)


def _reverse(rng):
  w = _words(rng, 2, 6)
  return _join(w), _join(w[::-1])


def _sort(rng):
  v = _numbers(rng, 2, 6)
  return _join(v), _join(sorted(v))


def _add(rng):
  a, b = rng.randrange(100), rng.randrange(100)
  return f"{a} + {b}", str(a + b)


def _upper(rng):
  w = _words(rng, 1, 4)
  return _join(w), _join(x.upper() for x in w)


def _count(rng):
  w = _words(rng, 1, 9)
  return _join(w), str(len(w))


def _dedupe(rng):
  pool = rng.sample(WORDS, 4)
  w = rng.choices(pool, k=rng.randint(3, 7))
  return _join(w), _join(dict.fromkeys(w))


LETTERS = tuple(sorted(set("".join(WORDS))))  # the letters `shift` draws from


def _shift(rng):
  s = rng.choices(LETTERS, k=rng.randint(3, 5))
  return _join(s), _join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


def _convert(rng):
  src, dst, factor = rng.choice(UNITS)
  v = rng.randint(1, 12 if factor == 60 else 99)
  return f"{v} {src} to {dst}", str(v * factor)


def _max(rng):
  v = _numbers(rng, 2, 6)
  return _join(v), str(max(v))


def _sum(rng):
  v = _numbers(rng, 2, 4, top=10)
  return _join(v), str(sum(v))


FAMILIES: dict[str, Callable] = {
    "reverse": _reverse, "sort": _sort, "add": _add, "upper": _upper, "count": _count,
    "dedupe": _dedupe, "shift": _shift, "convert": _convert, "max": _max, "sum": _sum,
}


def is_held_out(prompt: str) -> bool:
  """Whether a prompt belongs to the held-out space (stable across runs and machines)."""
  return zlib.crc32(prompt.encode()) % HELD_OUT_FRACTION == 0


def example(family: str, rng: random.Random) -> Example:
  """A random example of one family (training or held-out space alike)."""
  body, answer = FAMILIES[family](rng)
  return Example(family, f"{family}: {body}", answer)


def _draw(family: str, rng, held_out: bool) -> Example:
  for _ in range(10_000):
    ex = example(family, rng)
    if is_held_out(ex.prompt) == held_out:
      return ex
  raise RuntimeError(f"no {'held-out' if held_out else 'training'} prompt found for {family!r}")


def make_examples(n: int, seed: int = 0, *, held_out: bool = True, families=None) -> list[Example]:
  """n examples, families in turn (round robin), from the held-out space by default."""
  families = tuple(families or FAMILIES)
  unknown = set(families) - set(FAMILIES)
  if unknown:
    raise ValueError(f"unknown task families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
  rng = random.Random(seed)
  return [_draw(families[k % len(families)], rng, held_out) for k in range(n)]


def training_examples(n: int, rng: random.Random) -> list[Example]:
  """n training-space examples of uniformly random families."""
  names = tuple(FAMILIES)
  return [_draw(rng.choice(names), rng, False) for _ in range(n)]


def request_stream(n: int, kind: str = "runs", seed: int = 0, run_length: int = 8) -> list[Example]:
  """n held-out requests. kind="runs": families arrive in runs of `run_length` requests (a user's
  session), in a seeded random order of families; "shuffled": the same requests in random order."""
  if kind not in ("runs", "shuffled"):
    raise ValueError(f"stream kind must be 'runs' or 'shuffled', got {kind!r}")
  rng = random.Random(seed)
  names = tuple(FAMILIES)
  out = []
  while len(out) < n:
    family = rng.choice(names)
    out += [_draw(family, rng, True) for _ in range(min(run_length, n - len(out)))]
  if kind == "shuffled":
    rng.shuffle(out)
  return out


def corpus(n: int, seed: int = 0) -> list[str]:
  """Prompt and answer lines of n training examples (to train the tokenizer)."""
  rng = random.Random(seed)
  lines = []
  for ex in training_examples(n, rng):
    lines += [ex.prompt, ex.answer]
  return lines
