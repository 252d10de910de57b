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
# Powers of ten only: a factor like 60 (h to min) cannot be learnt from the few values it has, and its
# held-out values would be ones the model never saw multiplied.
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("l", "ml", 1000))
HELD_OUT_FRACTION = 10  # one prompt in 10 (by hash) is held out


@dataclasses.dataclass(frozen=True)
class Example:
  """One request: its task family, the prompt (with prefix) and the exact expected answer."""

  family: str
  prompt: str
  answer: str


def _words(rng, lo, hi):
  return rng.choices(WORDS, k=rng.randint(lo, hi))


def _number(rng, small: bool) -> int:
  return rng.randrange(10) if small else rng.randrange(100)


def _numbers(rng, lo, hi):
  """A list as people type them: all single digits (two lists in five), or 0-99 with a third of the
  entries single digits; one list in five drawn from a pool of two or three values (repeats)."""
  n = rng.randint(lo, hi)
  small = rng.random() < 0.4
  if rng.random() < 0.2:
    pool = [_number(rng, small) for _ in range(rng.randint(2, 3))]
    return [rng.choice(pool) for _ in range(n)]
  return [_number(rng, small or rng.random() < 1 / 3) for _ in range(n)]


def _join(xs):
  return " ".join(str(x) for x in xs)


def _reverse(rng):
  w = _words(rng, 1, 7)
  return _join(w), _join(w[::-1])


def _sort(rng):
  v = _numbers(rng, 1, 7)
  return _join(v), _join(sorted(v))


def _add(rng):
  a, b = (_number(rng, rng.random() < 0.4) for _ in range(2))
  return f"{a} + {b}", str(a + b)


def _upper(rng):
  w = _words(rng, 1, 5)
  return _join(w), _join(x.upper() for x in w)


def _count(rng):
  w = _words(rng, 1, 9) if rng.random() < 0.8 else [rng.choice(WORDS)] * rng.randint(1, 9)
  return _join(w), str(len(w))


def _dedupe(rng):
  pool = rng.sample(WORDS, rng.randint(1, 4))
  w = rng.choices(pool, k=rng.randint(2, 8))
  return _join(w), _join(dict.fromkeys(w))


# `shift` maps each letter to the next: a to x, whose successors a-y the tokenizer holds (it has no z).
LETTERS = tuple("abcdefghijklmnopqrstuvwx")


def _shift(rng):
  s = rng.choices(LETTERS, k=rng.randint(1, 6))
  return _join(s), _join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s)


def _convert(rng):
  src, dst, factor = rng.choice(UNITS)
  v = rng.randint(1, 9) if rng.random() < 0.4 else rng.randint(1, 99)
  return f"{v} {src} to {dst}", str(v * factor)


def _max(rng):
  v = _numbers(rng, 1, 7)
  return _join(v), str(max(v))


def _sum(rng):
  n = rng.randint(1, 5)
  v = [rng.randrange(10)] * n if rng.random() < 0.15 else [rng.randrange(10) for _ in range(n)]
  return _join(v), str(sum(v))


FAMILIES: dict[str, Callable] = {
    "reverse": _reverse, "sort": _sort, "add": _add, "upper": _upper, "count": _count,
    "dedupe": _dedupe, "shift": _shift, "convert": _convert, "max": _max, "sum": _sum,
}


# Prompts as a person types them at the CLI to try the model: short lists of single digits, repeats,
# one-item inputs, the largest and smallest values. Held out (never trained on) and reported apart.
HAND_TYPED = (
    "sort: 7 3 9 1 4", "sort: 7 3 9", "sort: 9 1 4", "sort: 5 2 9", "sort: 3 1 2", "sort: 1 2 3",
    "sort: 9 8 7 6 5 4 3", "sort: 4 4 1", "sort: 0 5 0", "sort: 6", "sort: 2 1", "sort: 10 9 8",
    "sort: 42 7 19 3", "sort: 99 0 50", "sort: 12 45 3 88",
    "reverse: cat dog sun", "reverse: red blue", "reverse: fish", "reverse: moon star rain snow",
    "add: 2 + 3", "add: 9 + 9", "add: 0 + 0", "add: 7 + 15", "add: 50 + 50", "add: 99 + 1", "add: 37 + 45",
    "upper: red fox", "upper: cat", "upper: blue moon star",
    "count: cat dog", "count: sun", "count: red red red red", "count: cat dog sun map red blue tree fish book",
    "dedupe: cat cat dog", "dedupe: red blue red blue", "dedupe: sun sun sun", "dedupe: fox owl fox owl egg",
    "shift: c a t", "shift: a", "shift: a b c", "shift: w x", "shift: h e l l o",
    "convert: 7 km to m", "convert: 1 kg to g", "convert: 5 l to ml", "convert: 3 m to cm",
    "convert: 9 cm to mm", "convert: 25 km to m",
    "max: 3 8 1", "max: 5", "max: 2 2 2", "max: 7 3 9 1 4", "max: 0 1", "max: 15 99 42",
    "sum: 1 2 3", "sum: 5 5", "sum: 9", "sum: 1 1 1 1 1", "sum: 9 9 9 9 9", "sum: 0 0",
)
_HAND_TYPED = frozenset(HAND_TYPED)


def is_held_out(prompt: str) -> bool:
  """Whether a prompt belongs to the held-out space (stable across runs and machines): one in
  `HELD_OUT_FRACTION` by hash, and every prompt of `HAND_TYPED`."""
  return prompt in _HAND_TYPED or zlib.crc32(prompt.encode()) % HELD_OUT_FRACTION == 0


def solve(prompt: str) -> str:
  """The exact answer to any prompt of the ten families (for prompts not drawn by a generator)."""
  family, _, body = prompt.partition(": ")
  items = body.split()
  if family not in FAMILIES or not items:
    raise ValueError(f"not a task prompt: {prompt!r}; families: {', '.join(FAMILIES)}")
  nums = [int(x) for x in items if x.isdigit()]
  if family == "reverse":
    return _join(items[::-1])
  if family == "sort":
    return _join(sorted(nums))
  if family == "add":
    return str(nums[0] + nums[1])
  if family == "upper":
    return _join(x.upper() for x in items)
  if family == "count":
    return str(len(items))
  if family == "dedupe":
    return _join(dict.fromkeys(items))
  if family == "shift":
    return _join(chr((ord(c) - 97 + 1) % 26 + 97) for c in items)
  if family == "convert":
    factor = {(src, dst): f for src, dst, f in UNITS}[(items[1], items[3])]
    return str(int(items[0]) * factor)
  return str(max(nums) if family == "max" else sum(nums))


def hand_typed_examples() -> list[Example]:
  """`HAND_TYPED` as examples (all held out)."""
  return [Example(p.split(":")[0], p, solve(p)) for p in HAND_TYPED]


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


def request_stream(n: int, kind: str = "runs", seed: int = 0, run_length: int = 8, *,
                   held_out: bool = True) -> list[Example]:
  """n held-out requests (training-space ones with `held_out=False`). kind="runs": families arrive in
  runs of `run_length` requests (a user's session), in a seeded random order of families; "shuffled":
  the same requests in random order."""
  if kind not in ("runs", "shuffled"):
    raise ValueError(f"stream kind must be 'runs' or 'shuffled', got {kind!r}")
  rng = random.Random(seed)
  names = tuple(FAMILIES)
  out = []
  while len(out) < n:
    family = rng.choice(names)
    out += [_draw(family, rng, held_out) for _ in range(min(run_length, n - len(out)))]
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
