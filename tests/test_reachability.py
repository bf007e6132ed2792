"""Tests for aikd_jax.reachability. Opens no connection that can succeed."""

import time

from aikd_jax import reachability

_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"


def test_connectivity_check_is_bounded():
  # 192.0.2.0/24 is TEST-NET-1: never routed, so a connect there hangs.
  for host in ("192.0.2.1", "host.invalid"):
    start = time.monotonic()
    assert not reachability.can_connect(host, 443, timeout=0.5)
    assert time.monotonic() - start < 2


def test_connection_target_honours_proxy(monkeypatch):
  for var in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    monkeypatch.delenv(var, raising=False)
  assert reachability.connection_target(_URL) == ("www.cs.toronto.edu", 443)
  monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
  assert reachability.connection_target(_URL) == ("proxy.example", 3128)
