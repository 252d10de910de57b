"""Code paths that differ between CPU, GPU and TPU, checked where they can be checked on the CPU.

Nothing here runs on a TPU; see the README's TPU section for what was not run.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swapmoe_jax.moe import router as router_lib
from swapmoe_jax.serving import loader
from swapmoe_jax.serving import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _xla_flags_after_import(tmp_path, jax_platforms, fake_plugin):
  """XLA_FLAGS as `import swapmoe_jax` leaves them, in a fresh interpreter."""
  tmp_path.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SWAPMOE_KEEP_XLA_AUTOTUNE", "JAX_PLATFORMS")}
  path = [ROOT]
  if fake_plugin:  # a module named like a JAX GPU plugin; never imported (the backend is not started)
    (tmp_path / "jax_cuda99_plugin").mkdir()
    (tmp_path / "jax_cuda99_plugin" / "__init__.py").write_text("")
    path.append(str(tmp_path))
  env["PYTHONPATH"] = os.pathsep.join(path)
  if jax_platforms is not None:
    env["JAX_PLATFORMS"] = jax_platforms
  out = subprocess.run([sys.executable, "-c", "import os, swapmoe_jax; print(os.environ.get('XLA_FLAGS', ''))"],
                       env=env, capture_output=True, text=True, check=True, cwd=str(tmp_path))
  return out.stdout.strip()


def test_gpu_autotune_flag_only_where_a_gpu_plugin_is_installed(tmp_path):
  # No GPU plugin (the CPU, a TPU VM): XLA_FLAGS untouched, so no runtime sees a flag it may not know.
  assert _xla_flags_after_import(tmp_path / "a", None, fake_plugin=False) == ""
  # A GPU plugin, but JAX_PLATFORMS keeps JAX off the GPU: untouched too.
  assert _xla_flags_after_import(tmp_path / "b", "cpu", fake_plugin=True) == ""
  assert _xla_flags_after_import(tmp_path / "c", "cuda,cpu", fake_plugin=True) == (
      "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false --xla_gpu_dot_merger_threshold_mb=0")


def test_router_logits_use_full_float32_precision():
  """XLA's default precision is one bfloat16 pass on TPUs: off NVIDIA GPUs the router must ask for
  HIGHEST; on them it sums float32 products in a reduction (no GEMM, no TF32). Both equal float64."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x, w: router_lib.route(x, w, None, jnp.arange(4, dtype=jnp.int32), 4,
                                                       exact=False))(x, w)
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond" and "branches_platforms" in e.params]
  assert len(conds) == 1, jaxpr
  branches = dict(zip(conds[0].params["branches_platforms"], conds[0].params["branches"]))
  gpu, other = branches[("cuda",)].jaxpr, branches[None].jaxpr
  dots = [e for e in other.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1, other
  precision = dots[0].params["precision"]
  assert precision is not None and all(p == jax.lax.Precision.HIGHEST for p in precision), precision
  assert dots[0].invars[0].aval.dtype == jnp.float32
  prims = [e.primitive.name for e in gpu.eqns]
  assert "dot_general" not in prims and "reduce_sum" in prims
  assert all(v.aval.dtype == jnp.float32 for e in gpu.eqns if e.primitive.name in ("mul", "reduce_sum")
             for v in e.outvars)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for fn in (router_lib._logits_sum, router_lib._logits_dot):
    np.testing.assert_allclose(np.asarray(fn(x, w)), ref, rtol=1e-6, atol=1e-6)


def test_host_store_falls_back_to_numpy_without_pinned_host(monkeypatch):
  """Platforms without a `pinned_host` memory keep experts in numpy and gather them on the host."""
  rng = np.random.default_rng(0)
  experts = [(rng.normal(size=(4, 3, 5)).astype(np.float32), rng.normal(size=(4, 5, 3)).astype(np.float32))]
  pinned = store_lib.HostExpertStore.from_numpy(experts, np.ones((1, 4)), jnp.float32)
  monkeypatch.setattr(store_lib, "host_memory_kind", lambda device: None)
  plain = store_lib.HostExpertStore.from_numpy(experts, np.ones((1, 4)), jnp.float32)
  assert pinned.memory_kind == "pinned_host"  # the CPU backend of jax >= 0.6 has it
  assert pinned.wi[0].sharding.memory_kind == "pinned_host"
  assert plain.memory_kind is None and isinstance(plain.wi[0], np.ndarray)
  for store in (pinned, plain):
    wi, wo = store.gather_to_device(0, [3, 1])
    assert wi.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(wi), experts[0][0][[3, 1]].transpose(0, 2, 1))  # [out, in]
    np.testing.assert_array_equal(np.asarray(wo), experts[0][1][[3, 1]].transpose(0, 2, 1))


def test_pinned_store_built_as_banks_equals_rows_then_banks():
  """`from_numpy(banks=True)` (what `load` asks for when exact routing or "gather" staging will need
  banks) starts in the banks layout, in pinned memory, with the bytes that rows-then-`banks()` gives,
  and stages the same rows."""
  rng = np.random.default_rng(2)
  experts = [(rng.normal(size=(5, 3, 4)).astype(np.float32), rng.normal(size=(5, 4, 3)).astype(np.float32))
             for _ in range(2)]
  direct = store_lib.HostExpertStore.from_numpy(experts, np.ones((2, 5)), jnp.float32, banks=True)
  via_rows = store_lib.HostExpertStore.from_numpy(experts, np.ones((2, 5)), jnp.float32)
  assert direct.layout == "banks" and via_rows.layout == "rows"
  assert direct.expert_shapes == via_rows.expert_shapes and direct.expert_bytes == via_rows.expert_bytes
  for (wi_a, wo_a), (wi_b, wo_b) in zip(direct.banks(), via_rows.banks()):
    assert wi_a.sharding.memory_kind == wo_a.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(wi_a), np.asarray(wi_b))
    np.testing.assert_array_equal(np.asarray(wo_a), np.asarray(wo_b))
  np.testing.assert_array_equal(direct.expert(1, 3)[0], experts[1][0][3].T)
  for a, b in zip(direct.gather_to_device(1, [4, 0]), via_rows.gather_to_device(1, [4, 0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_swap_staging_writes_into_the_same_device_buffers():
  """A swap's rows land in the store's own staging buffers, written in place (`reuse=True`): a swap
  allocates no device memory, which on a GPU keeps the decode programs' buffer addresses, and so their
  CUDA graphs, unchanged. The rows equal a fresh gather's, and the buffers number the most rows staged."""
  rng = np.random.default_rng(3)
  experts = [(rng.normal(size=(5, 3, 4)).astype(np.float32), rng.normal(size=(5, 4, 3)).astype(np.float32))
             for _ in range(2)]
  store = store_lib.HostExpertStore.from_numpy(experts, np.ones((2, 5)), jnp.float32, banks=True)
  pointers = lambda rows: [x.unsafe_buffer_pointer() for row in rows for x in row]  # noqa: E731
  first = pointers(store.stage_rows([(0, 3), (1, 1)], reuse=True))
  fresh = store.stage_rows([(1, 4), (0, 0)])
  again = store.stage_rows([(1, 4), (0, 0)], reuse=True)
  assert pointers(again) == first and pointers(fresh) != first
  for got, want in zip(again, fresh):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (wi, wo), = store.stage_rows([(0, 2)], reuse=True)
  assert pointers([(wi, wo)]) == first[:2]
  np.testing.assert_array_equal(np.asarray(wi)[0], experts[0][0][2].T)
  np.testing.assert_array_equal(np.asarray(wo)[0], experts[0][1][2].T)
  assert store.staging_bytes == 2 * store.expert_bytes


def test_needs_banks_for_exact_and_selective_routing_and_gather_staging():
  """Exact and selective routing and "gather" staging want banks; the others start as rows (pinned) or
  numpy (pageable)."""
  assert loader.needs_banks("lfu", "pageable") and loader.needs_banks("selective", "pageable")
  assert loader.needs_banks("swapmoe", "gather")
  assert not loader.needs_banks("swapmoe", "pageable") and not loader.needs_banks("swapmoe", "transfer")
  assert not loader.needs_banks("full", "pageable")


def test_auto_staging_gathers_on_a_gpu_while_the_experts_fit_pinned(monkeypatch):
  """"auto" is "gather" on a GPU with one device and experts within `GATHER_MAX_BYTES`, else "pageable";
  the other stagings stand as given."""
  from swapmoe_jax.models.switch.config import SwitchConfig

  cfg = SwitchConfig(d_model=768, d_ff=3072, num_experts=64)  # switch-base-64's experts
  total = 2 * 768 * 3072 * 2 * 64 * cfg.num_moe_layers  # wi and wo of every expert, bfloat16
  assert loader.resolve_staging("auto", cfg, 2, platform="gpu") == "gather"
  assert loader.resolve_staging("auto", cfg, 2, platform="cpu") == "pageable"
  assert loader.resolve_staging("auto", cfg, 2, platform="tpu") == "pageable"
  assert loader.resolve_staging("auto", cfg, 2, platform="gpu", mesh=object()) == "pageable"
  monkeypatch.setattr(loader, "GATHER_MAX_BYTES", total - 1)
  assert loader.resolve_staging("auto", cfg, 2, platform="gpu") == "pageable"
  monkeypatch.setattr(loader, "GATHER_MAX_BYTES", total)
  assert loader.resolve_staging("auto", cfg, 2, platform="gpu") == "gather"
  for staging in ("pageable", "transfer", "gather"):
    assert loader.resolve_staging(staging, cfg, 2, platform="gpu") == staging
  with pytest.raises(ValueError, match="unknown staging"):
    loader.resolve_staging("dma", cfg, 2, platform="gpu")


def test_load_asks_for_banks_from_the_start_for_exact_routing(monkeypatch):
  """`load` with an exact policy builds its store as pinned banks (one copy into pinned memory), and
  its model reads those banks."""
  from swapmoe_jax import default_checkpoint, load

  asked = []
  original = store_lib.HostExpertStore.from_numpy.__func__

  def spy(cls, *args, **kwargs):
    asked.append(kwargs.get("banks", False))
    return original(cls, *args, **kwargs)

  monkeypatch.setattr(loader.HostExpertStore, "from_numpy", classmethod(spy))
  model = load(default_checkpoint(), experts=3, policy="lfu", max_batch_size=1, max_source_len=16,
               max_new_tokens=4)
  assert asked == [True]
  assert model.store.layout == "banks" and model.store.memory_kind == "pinned_host"


def test_pinned_store_stages_rows_until_banks_are_asked_for():
  """A pinned store starts as per-expert rows (staged by device_put, no program to compile); reading an
  expert keeps that layout; `banks()` stacks them once, releases the rows, and staging still returns
  the same bytes."""
  rng = np.random.default_rng(1)
  experts = [(rng.normal(size=(6, 3, 5)).astype(np.float32), rng.normal(size=(6, 5, 3)).astype(np.float32))
             for _ in range(2)]
  store = store_lib.HostExpertStore.from_numpy(experts, np.ones((2, 6)), jnp.float32)
  assert store.layout == "rows" and store.expert_bytes == (15 + 15) * 4
  for layer, e in ((0, 5), (1, 2)):
    wi, wo = store.expert(layer, e)  # [out, in], torch Linear's orientation
    np.testing.assert_array_equal(wi, experts[layer][0][e].T)
    np.testing.assert_array_equal(wo, experts[layer][1][e].T)
  before = store_lib._gather_rows._cache_size()
  staged = [store.gather_to_device(1, [e]) for e in range(6)]
  assert store.layout == "rows" and store_lib._gather_rows._cache_size() == before, "rows are staged without a program"
  banks = store.banks()
  assert store.layout == "banks" and banks[1][0].sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(np.asarray(banks[1][0]), experts[1][0].transpose(0, 2, 1))
  for e, (wi, wo) in enumerate(staged):
    again = store.gather_to_device(1, [e])
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(wi))
    np.testing.assert_array_equal(np.asarray(again[1]), experts[1][1][e:e + 1].transpose(0, 2, 1))
  np.testing.assert_array_equal(store.expert(0, 4)[1], experts[0][1][4].T)


@pytest.mark.parametrize("start", ["rows", "banks"])
def test_every_layout_stages_a_commit_in_one_call_with_the_same_bytes(start):
  """`stage_rows` copies experts of several layers at once (what a commit stages), from pinned rows,
  pinned banks (one program per row count, a bank repeated as rows need) or, after `to_pageable()`,
  numpy banks (the pinned arrays released); every layout returns the same bytes, on the device."""
  rng = np.random.default_rng(2)
  experts = [(rng.normal(size=(5, 3, 4)).astype(np.float32), rng.normal(size=(5, 4, 3)).astype(np.float32))
             for _ in range(3)]
  store = store_lib.HostExpertStore.from_numpy(experts, np.ones((3, 5)), jnp.float32)
  if start == "banks":
    store.banks()
  pairs = [(2, 4), (0, 1), (2, 0)]
  want = [(experts[l][0][e:e + 1].transpose(0, 2, 1), experts[l][1][e:e + 1].transpose(0, 2, 1)) for l, e in pairs]

  def check(rows):
    assert len(rows) == len(pairs)
    for (wi, wo), (a, b) in zip(rows, want):
      assert wi.sharding.memory_kind == "device" and wi.shape == (1, 4, 3) and wo.shape == (1, 3, 4)
      np.testing.assert_array_equal(np.asarray(wi), a)
      np.testing.assert_array_equal(np.asarray(wo), b)

  assert store.layout == start and store.memory_kind == "pinned_host"
  check(store.stage_rows(pairs))
  store.to_pageable()
  assert store.layout == "banks" and store.memory_kind is None and isinstance(store.wi[2], np.ndarray)
  check(store.stage_rows(pairs))
  np.testing.assert_array_equal(store.expert(1, 3)[0], experts[1][0][3].T)
  assert store.stage_rows([]) == ()
