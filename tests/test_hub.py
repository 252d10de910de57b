"""hub_reachable, offline: a local HTTP server stands in for the hub."""

import http.server
import socket
import threading

import pytest

from swapmoe_jax.hub import hub_reachable


@pytest.fixture
def local_server():
  class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's naming
      self.send_response(404)  # any status counts as an answer
      self.end_headers()

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_an_answering_endpoint_is_reachable(monkeypatch, local_server):
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("HF_ENDPOINT", local_server)
  assert hub_reachable(timeout=5)


def test_offline_flag_and_a_closed_port_are_unreachable(monkeypatch, local_server):
  monkeypatch.setenv("HF_ENDPOINT", local_server)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert not hub_reachable(timeout=5)  # no request made, though the server would answer
  monkeypatch.delenv("HF_HUB_OFFLINE")
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
  assert not hub_reachable(timeout=5)
  monkeypatch.setenv("HF_ENDPOINT", "not a url")
  assert not hub_reachable(timeout=5)
