"""VirtualExpertMoE's eager slot helpers (place_experts, put_expert), used by one's own Flax models."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swapmoe_jax import VirtualExpertMoE

D, F, E, K = 4, 6, 5, 3


@pytest.fixture
def layer():
  return VirtualExpertMoE(D, F, E, K, capacity=8, rngs=nnx.Rngs(0))


@pytest.fixture
def bank():
  rng = np.random.default_rng(0)
  # The slots' orientation, torch Linear's [out, in]: wi [E, F, D], wo [E, D, F].
  return rng.normal(size=(E, F, D)).astype(np.float32), rng.normal(size=(E, D, F)).astype(np.float32)


def test_place_experts_fills_slots_in_order_and_the_index_map(layer, bank):
  wi, wo = bank
  layer.place_experts([4, 1], wi, wo)
  np.testing.assert_array_equal(layer.slot_of[...], [-1, 1, -1, -1, 0])
  np.testing.assert_array_equal(layer.wi[...][:2], wi[[4, 1]])
  np.testing.assert_array_equal(layer.wo[...][:2], wo[[4, 1]])
  assert layer.resident_experts().tolist() == [4, 1, -1]


def test_put_expert_evicts_the_slots_previous_expert(layer, bank):
  wi, wo = bank
  layer.place_experts([0, 1, 2], wi, wo)
  assert layer.put_expert(1, 3, wi[3], wo[3]) == 1
  np.testing.assert_array_equal(layer.slot_of[...], [0, -1, 2, 1, -1])
  np.testing.assert_array_equal(layer.wi[...][1], wi[3])
  np.testing.assert_array_equal(layer.wo[...][1], wo[3])
  assert layer.put_expert(1, 3, wi[3], wo[3]) == -1  # already there: nothing evicted
  assert layer.resident_experts().tolist() == [0, 3, 2]


def test_helpers_keep_shapes_and_dtypes(layer, bank):
  before = [(v.shape, v.dtype) for v in (layer.wi[...], layer.wo[...], layer.slot_of[...])]
  layer.place_experts([2], bank[0].astype(np.float64), bank[1])
  layer.put_expert(2, 4, bank[0][4], bank[1][4])
  assert [(v.shape, v.dtype) for v in (layer.wi[...], layer.wo[...], layer.slot_of[...])] == before
  assert layer.slot_of[...].dtype == jnp.int32


@pytest.mark.parametrize("experts, message", [
    ([0, 0], "distinct"), ([5], r"in \[0, 5\)"), ([-1], r"in \[0, 5\)"), ([0, 1, 2, 3], "1 to K=3"), ([], "1 to K=3"),
    ([0.5], "integers"),
])
def test_place_experts_rejects_bad_experts(layer, bank, experts, message):
  with pytest.raises(ValueError, match=message):
    layer.place_experts(experts, *bank)


def test_bad_shapes_and_indices_are_one_clear_error(layer, bank):
  wi, wo = bank
  with pytest.raises(ValueError, match=r"wi must have shape \(5, 6, 4\), got \(4, 6, 4\)"):
    layer.place_experts([0], wi[:4], wo)
  with pytest.raises(ValueError, match=r"wo must have shape \(4, 6\), got \(6, 4\)"):
    layer.put_expert(0, 0, wi[0], wi[0])
  with pytest.raises(ValueError, match=r"slot must be in \[0, 3\), got 3"):
    layer.put_expert(3, 0, wi[0], wo[0])
  with pytest.raises(ValueError, match=r"expert must be in \[0, 5\), got 7"):
    layer.put_expert(0, 7, wi[0], wo[0])
