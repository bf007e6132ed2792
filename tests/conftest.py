"""Shared test helpers: running a snippet on several fake CPU devices.

The number of host devices is fixed when JAX initialises, so multi-device
checks run in a fresh Python process with XLA_FLAGS set before `import jax`.
"""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")


def run_on_cpu_devices(code: str, num_devices: int = 8,
                       timeout: float = 600.0) -> dict:
  """Runs `code` in a subprocess with `num_devices` CPU devices.

  The snippet sees the repository root and tests/ on sys.path and must print
  one JSON object as its last line of stdout; that object is returned.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT, TESTS_DIR] +
      ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (
      f"subprocess failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
  lines = proc.stdout.strip().splitlines()
  assert lines, f"subprocess printed nothing; stderr:\n{proc.stderr[-3000:]}"
  return json.loads(lines[-1])


@pytest.fixture(scope="session")
def cpu_devices_runner():
  """The `run_on_cpu_devices` helper, as a fixture."""
  return run_on_cpu_devices
