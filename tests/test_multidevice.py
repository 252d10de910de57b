"""Expert parallelism: per-device plans (host-only, here) and the sharded model on 8 simulated CPU
devices (`multidevice_cases.py`, in a subprocess, so that the rest of the suite keeps one device)."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapmoe_jax.serving.budget import (
    BudgetError, expert_bytes_each, fallback_bytes, full_model_bytes, memory_breakdown, min_budget_bytes)
from swapmoe_jax.models.switch.config import SwitchConfig
from swapmoe_jax.serving.planner import plan_calibrated, plan_full, plan_uniform

TINY = SwitchConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=4, num_decoder_layers=4,
                    num_experts=8, expert_capacity=8)
SHAPE = (2, 1, 16, 8)  # dtype bytes, batch, source, target
TESTS = os.path.dirname(os.path.abspath(__file__))


# --- per-device accounting and plans (host only) ------------------------------------------------


def test_each_device_counts_its_share_of_the_slots_and_a_copy_of_the_rest():
  one = memory_breakdown(TINY, 2, [8, 4, 2, 6], 1, 16, 8, staging_slots=2)
  per_device = memory_breakdown(TINY, 2, [8, 4, 2, 6], 1, 16, 8, staging_slots=2, devices=2)
  assert per_device.expert_bytes == one.expert_bytes // 2 == 10 * expert_bytes_each(TINY, 2)
  assert (per_device.dense_bytes, per_device.kv_cache_bytes, per_device.staging_bytes, per_device.workspace_bytes) \
      == (one.dense_bytes, one.kv_cache_bytes, one.staging_bytes, one.workspace_bytes)
  with pytest.raises(ValueError, match="multiple of the 4 devices"):
    memory_breakdown(TINY, 2, [8, 4, 2, 6], 1, 16, 8, staging_slots=2, devices=4)
  assert full_model_bytes(TINY, 2, 4) == one.dense_bytes + 4 * 8 * expert_bytes_each(TINY, 2) // 4  # L=4, E=8


def test_each_device_counts_its_share_of_the_fallback_copies():
  one = memory_breakdown(TINY, 2, [8, 4, 2, 6], 1, 16, 8, staging_slots=2, fallback=True)
  per_device = memory_breakdown(TINY, 2, [8, 4, 2, 6], 1, 16, 8, staging_slots=2, devices=2, fallback=True)
  assert per_device.fallback_bytes * 2 == one.fallback_bytes == fallback_bytes(TINY) > 0
  assert memory_breakdown(TINY, 2, [8] * 4, 1, 16, 8, 2, devices=8, fallback=4).fallback_bytes \
      == fallback_bytes(TINY, 4) // 8
  odd = dataclasses.replace(TINY, num_experts=6)
  with pytest.raises(ValueError, match="fallback copies of the 6 experts .* over 4 devices"):
    memory_breakdown(odd, 2, [4] * 4, 1, 16, 8, 2, devices=4, fallback=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices=st.sampled_from([1, 2, 4, 8]), scale=st.floats(0.05, 1.2), swaps=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_per_device_plans_split_evenly_never_exceed_and_are_maximal(devices, scale, swaps, seed):
  dtype_bytes, batch, src, tgt = SHAPE
  full = memory_breakdown(TINY, dtype_bytes, [8] * 4, batch, src, tgt, 0, devices).total
  budget = int(full * scale)
  importance = np.random.default_rng(seed).exponential(size=(4, 8))
  for plan_fn, extra in ((plan_uniform, ()), (plan_calibrated, (importance,))):
    try:
      plan = plan_fn(TINY, budget, dtype_bytes, batch, src, tgt, *extra, max_swaps_per_step=swaps, devices=devices)
    except BudgetError as e:
      assert budget < min_budget_bytes(TINY, dtype_bytes, batch, src, tgt, swaps, devices)
      assert devices == 1 or f"per device ({devices} devices" in str(e)
      continue
    assert plan.devices == devices and plan.breakdown.total <= budget
    assert all(k % devices == 0 and devices <= k <= 8 for k in plan.slots_per_layer)
    assert plan.breakdown == memory_breakdown(TINY, dtype_bytes, plan.slots_per_layer, batch, src, tgt,
                                              plan.staging_slots, devices)
    for layer, k in enumerate(plan.slots_per_layer):  # maximal: no layer takes one more slot per device
      if k < 8 and plan.staging_slots:
        more = list(plan.slots_per_layer)
        more[layer] += devices
        assert memory_breakdown(TINY, dtype_bytes, more, batch, src, tgt, swaps, devices).total > budget


def test_the_uniform_planner_rounds_down_to_a_multiple_of_the_devices():
  dtype_bytes, batch, src, tgt = SHAPE
  one_more = memory_breakdown(TINY, dtype_bytes, [8, 6, 6, 6], batch, src, tgt, 2, devices=2).total
  plan = plan_uniform(TINY, one_more - 1, dtype_bytes, batch, src, tgt, devices=2)
  assert plan.slots_per_layer == (6,) * 4  # almost one more expert per device: not a whole slot on each
  assert "split over 2 devices" in plan.reason and "per device" in plan.reason
  assert plan_uniform(TINY, one_more, dtype_bytes, batch, src, tgt, devices=2).slots_per_layer == (8, 6, 6, 6)


def test_devices_that_do_not_divide_the_experts_are_refused():
  with pytest.raises(ValueError, match="the 8 experts of each MoE layer do not split evenly over 3 devices"):
    plan_uniform(TINY, 10**9, *SHAPE, devices=3)
  with pytest.raises(BudgetError, match="on each of 2 devices"):
    plan_full(TINY, 1000, *SHAPE, devices=2)


# --- the sharded model on 8 simulated devices ---------------------------------------------------------


def test_eight_simulated_devices():
  """Runs `multidevice_cases.py`: every policy on 8 (and lru on 2) devices equals the one-device model,
  swaps never recompile, each device holds its share of the plan, bad device counts are refused."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS]),
             # 8 devices; cheaper CPU code generation: compilation dominates these tests' time
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "multidevice_cases.py"],
                        cwd=TESTS, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
