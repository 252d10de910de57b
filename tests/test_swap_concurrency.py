"""Asynchronous swaps under randomized timing: writes land in issue order, never under a step in flight.

The executor stages experts and commits them with donated, in-place writes while earlier device
programs may still be running (JAX dispatches asynchronously, also on the CPU). What makes this safe
is the runtime's ordering: programs run in issue order, and a donated buffer is only overwritten once
every program issued before the donation has read it. These tests do not restate that argument; they
drive the real executor and the real serving loop with random device-side delays, random host sleeps
and random interleavings of steps, staging, commits and reads, and check every step's view:
  (a) each step sees exactly the slot contents of the writes issued before it, in issue order;
  (b) the index map each step sees agrees with its slot buffers (read back, compared with the store);
  (c) outputs equal a reference built fresh with the resident set the step should have seen.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swapmoe_jax
from swapmoe_jax import checkpoint as ckpt
from swapmoe_jax.serving import budget as budget_lib
from swapmoe_jax.serving import decode, loader
from swapmoe_jax.serving.decode import Flat
from swapmoe_jax.serving.executor import SwapExecutor
from swapmoe_jax.serving.swap import SlotWrite

K = (2, 3, 1, 2)  # slots per MoE layer of the tiny model (E = 4)


@pytest.fixture(scope="module")
def parts(converted_tiny):
  meta = ckpt.read_metadata(converted_tiny()[1])
  store = loader.HostExpertStore.from_numpy(ckpt.restore_all_experts(meta), meta.expert_norms, np.float32)
  return meta.config, ckpt.restore_dense(meta), store


@jax.jit
def _probe(slots, spin):
  """A step of random length that then copies every slot buffer and index map, as a step reads them."""
  a = jnp.eye(64) * 0.5 + 0.01
  burn = jax.lax.fori_loop(0, spin, lambda i, a: jnp.tanh(a @ a), a)
  _, leaves = jax.lax.optimization_barrier((burn, slots.leaves))  # the reads come after the burn
  return tuple(jnp.copy(x) for x in leaves)


def _index_map(resident, num_experts):
  m = np.full(num_experts, -1, np.int32)
  m[np.asarray(resident)] = np.arange(len(resident))
  return m


_IDS = np.array([[5, 17, 33, 60, 1], [7, 8, 9, 1, 0]])
_DEC = np.array([[0, 12, 40], [0, 3, 3]])


def _forward(graphdef, params, slots):
  logits, _, _ = decode.forward(graphdef, params, slots, _IDS, _IDS != 0, _DEC, None, None)
  return logits


ops = st.lists(st.one_of(
    st.tuples(st.just("probe"), st.integers(0, 600)),
    st.tuples(st.just("forward"), st.just(0)),
    st.tuples(st.just("write"), st.integers(1, 2)),  # stage and commit at once
    st.tuples(st.just("stage"), st.integers(1, 2)),  # stage now, commit at a later "commit"
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("sleep"), st.integers(0, 15)),
    st.tuples(st.just("check"), st.just(0)),
), min_size=5, max_size=30)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=ops, data=st.data())
def test_random_interleavings_of_steps_and_swaps(parts, ops, data):
  cfg, dense, store = parts
  E = cfg.num_experts
  resident = [list(range(k)) for k in K]  # the state every later step must see, in issue order
  graphdef, params, slots = loader.build_model(cfg, dense, store, slots_per_layer=K,
                                               resident=[np.asarray(r) for r in resident])
  ex = SwapExecutor(store, cfg.moe_layers, K, max_writes=2)
  slots = Flat.of(slots)
  positions = None
  staged = None  # (rows, writes, resident after them) staged but not committed
  outstanding = []  # (kind, device result, resident it must reflect)
  refs = {}

  def draw_writes(n, base):
    """n writes on copies of `base`; two may hit the same slot (the later must win)."""
    after = [list(r) for r in base]
    writes = []
    for _ in range(n):
      layer = data.draw(st.integers(0, len(K) - 1))
      absent = [e for e in range(E) if e not in after[layer]]
      if not absent:
        continue
      slot = data.draw(st.integers(0, K[layer] - 1))
      expert = data.draw(st.sampled_from(absent))
      writes.append(SlotWrite(layer, slot, expert, after[layer][slot]))
      after[layer][slot] = expert
    return writes, after

  def check():
    nonlocal positions
    from swapmoe_jax.serving.executor import slot_leaf_positions

    positions = positions or slot_leaf_positions(slots, cfg.moe_layers)
    for kind, result, want in outstanding:
      if kind == "probe":
        for layer, (a, b, m) in enumerate(positions):
          np.testing.assert_array_equal(np.asarray(result[m]), _index_map(want[layer], E))  # (a), (b)
          np.testing.assert_array_equal(np.asarray(result[a]), np.asarray(store.wi[layer])[want[layer]])
          np.testing.assert_array_equal(np.asarray(result[b]), np.asarray(store.wo[layer])[want[layer]])
      else:  # (c)
        key = tuple(map(tuple, want))
        if key not in refs:
          refs[key] = np.asarray(_forward(*loader.build_model(cfg, dense, store, slots_per_layer=K,
                                                               resident=[np.asarray(r) for r in want])))
        np.testing.assert_array_equal(np.asarray(result), refs[key])
    outstanding.clear()

  for op, arg in ops:
    if op == "probe":
      outstanding.append(("probe", _probe(slots, np.int32(arg)), [list(r) for r in resident]))
    elif op == "forward":
      outstanding.append(("forward", _forward(graphdef, params, slots), [list(r) for r in resident]))
    elif op == "write" or (op == "stage" and staged is None):
      writes, after = draw_writes(arg, resident)
      rows = ex.stage(writes)
      if op == "stage":
        staged = rows, writes, after
        continue
      slots = ex.commit(slots, rows, writes, [_index_map(r, E) for r in after])
      resident = after
    elif op == "commit" and staged is not None:
      # Drawn against the state at staging: drop those whose expert a commit since has made resident.
      after, kept = [list(r) for r in resident], []
      for row, w in zip(*staged[:2]):
        if w.expert not in after[w.layer]:
          after[w.layer][w.slot] = w.expert
          kept.append((row, w))
      staged = None
      slots = ex.commit(slots, [r for r, _ in kept], [w for _, w in kept], [_index_map(r, E) for r in after])
      resident = after
    elif op == "sleep":
      time.sleep(arg / 1000)
    elif op == "check":
      check()
  outstanding.append(("probe", _probe(slots, np.int32(0)), [list(r) for r in resident]))
  check()


# --- the serving loop, end to end --------------------------------------------------------------------


def assert_slots_agree(model):
  """Every slot holds, byte for byte, the host store's copy of the expert the controller says it holds,
  and every layer's index map is the controller's."""
  pure = nnx.to_pure_dict(model.slots)
  state = model.residency.controller.state
  for layer, (stack, i) in enumerate(model.config.moe_layers):
    moe = pure[stack]["blocks"][i]["moe"]
    np.testing.assert_array_equal(np.asarray(moe["slot_of"]), state.index_map(layer))
    filled = state.slot_expert[layer]
    np.testing.assert_array_equal(np.asarray(moe["wi"]), np.asarray(model.store.wi[layer])[filled])
    np.testing.assert_array_equal(np.asarray(moe["wo"]), np.asarray(model.store.wo[layer])[filled])


def half_budget(cfg, **shape):
  """A budget of float32 weights, caches and workspace for `shape`, plus half the experts."""
  half = [cfg.num_experts // 2] * cfg.num_moe_layers
  return budget_lib.memory_breakdown(cfg, 4, half, staging_slots=2, **shape).total


@pytest.mark.parametrize("policy", ["lru", "swapmoe"])
def test_generate_with_random_host_timing(converted_tiny, policy):
  """Random sleeps between steps (the device runs ahead or falls behind the host), reads of the slot
  state at random steps; an exact policy still equals the full model token for token, and swapmoe
  equals a twin fed the same requests without any sleeps or reads."""
  folder = converted_tiny()[1]
  cfg = ckpt.read_metadata(folder).config
  shape = dict(max_batch_size=2, max_source_len=8, max_new_tokens=16, update_every=1, max_swaps_per_step=2)
  budget = half_budget(cfg, batch=2, src_len=8, tgt_len=64)
  model = swapmoe_jax.load(folder, budget=budget, policy=policy, **shape)
  reference = swapmoe_jax.load(folder) if policy == "lru" else swapmoe_jax.load(folder, budget=budget,
                                                                               policy=policy, **shape)
  rng = np.random.default_rng(0)
  checked = 0

  def jitter(step, tokens):
    nonlocal checked
    if rng.random() < 0.3:
      assert_slots_agree(model)
      checked += 1
    time.sleep(rng.choice([0, 0, 0.001, 0.005]))

  for _ in range(6):
    ids = rng.integers(2, 96, (2, 8))
    ids[1, 5:] = 0
    got = model.generate(ids, ids != 0, max_new_tokens=16, stream=jitter)
    np.testing.assert_array_equal(got, reference.generate(ids, ids != 0, max_new_tokens=16))
  assert_slots_agree(model)
  assert checked > 5 and model.stats.summary()["experts_swapped"] > 0
