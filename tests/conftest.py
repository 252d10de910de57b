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
