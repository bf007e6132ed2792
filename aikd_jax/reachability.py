"""Whether a download host can be reached now, answered within seconds.

Offline, TFDS retries an unreachable host 10 times with exponential back-off
(204 s for a DNS failure with TFDS 4.9.10, longer behind a firewall that drops
packets). One bounded TCP connection to the host, or to the HTTPS proxy when
one is configured, lets a missing dataset fail fast instead.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request

CONNECT_TIMEOUT_S = 3.0


def unreachable_reason(url: str) -> str | None:
  """Why a download of `url` cannot start now, or None if it can."""
  host, port = connection_target(url)
  if can_connect(host, port, CONNECT_TIMEOUT_S):
    return None
  return (
    f"no connection to {host}:{port} within {CONNECT_TIMEOUT_S:g} s: offline?"
  )


def connection_target(url: str) -> tuple[str, int]:
  """The host and port a download of `url` connects to (its proxy, if any)."""
  parsed = urllib.parse.urlsplit(url)
  host = parsed.hostname or ""
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  proxy = urllib.request.getproxies().get(parsed.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_url = urllib.parse.urlsplit(
      proxy if "://" in proxy else f"http://{proxy}"
    )
    if proxy_url.hostname:
      return proxy_url.hostname, proxy_url.port or 80
  return host, port


def can_connect(host: str, port: int, timeout: float) -> bool:
  """Whether a TCP connection opens within `timeout` s, DNS lookup included."""
  result = []

  def probe():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)

  # getaddrinfo ignores socket timeouts, so the whole probe runs in a daemon
  # thread that is abandoned if it outlives `timeout`.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])
