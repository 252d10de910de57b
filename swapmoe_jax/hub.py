"""Whether the Hugging Face hub answers: notebooks pick their network mode with it."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

_OFFLINE_VALUES = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
  """True when the hub ($HF_ENDPOINT, default https://huggingface.co) answers an HTTP request within
  `timeout` seconds, with any status; False offline, and when HF_HUB_OFFLINE is set (no request then)."""
  if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES:
    return False
  endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
  try:
    with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
      return True
  except urllib.error.HTTPError:  # an answer, even 4xx/5xx: the network reaches it
    return True
  except (OSError, ValueError):  # URLError, timeouts, refused connections, malformed endpoints
    return False
