import os
import sys

import pytest

# Tests run on the CPU; keep JAX off any accelerator and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_fixtures import converted_tiny  # noqa: E402,F401  (session fixture)


@pytest.fixture(scope="module")
def xla_compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache for one test module (its folder): tests that load a model many
  times retrace the same programs (weights are arguments), and with the cache skip their XLA compiles."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  folder = str(tmp_path_factory.mktemp("xla-cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (folder, 0.0, 0)):
    jax.config.update(name, value)
  cc.reset_cache()
  yield folder
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each compiled CPU program holds ~6 memory
  mappings until it is cleared (300 small programs: 435 -> 2297 mappings, 527 after
  `jax.clear_caches()`); the whole suite in one process, kept for its life, crashed XLA's CPU compiler
  late in the run (a segfault, or an abort, in `backend_compile_and_load`, at whichever test compiled
  next, never alone), near the process's limit of mappings (`vm.max_map_count`, 65530 here)."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
