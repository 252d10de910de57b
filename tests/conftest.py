import os
import sys

# Tests run on the CPU; keep JAX off any accelerator and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_fixtures import converted_tiny  # noqa: E402,F401  (session fixture)
