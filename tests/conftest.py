"""Session-wide test setup: fake CPU devices, and the fast and slow tiers.

Devices. JAX fixes its CPU device count when its backend starts, so it is
set here, before any test runs a JAX operation: 8 fake CPU devices
(`jax_num_cpu_devices`, the config form of XLA's
--xla_force_host_platform_device_count). Multi-device tests take them from
the `eight_devices` fixture and build their meshes in this process
(`banks.data_mesh(eight_devices)`, `eight_devices[:1]` for the 1-device
side of a comparison); nothing is spawned for a multi-device check.

Everything else sees one device, as on a plain CPU run: jax.devices(),
jax.device_count(), jax.local_devices() and jax.local_device_count() are
narrowed to the first device for the whole session. So code under test that
uses "all devices" (banks.data_mesh() without arguments, run_config's check
that batch sizes divide by the device count and the count it saves with the
config, train.train_and_evaluate called in-process, orbax restoring a
checkpoint) behaves exactly as it would on one device; JAX's own placement
(default device 0) is unchanged. Only `eight_devices` reaches past the
first device.

The count is this process's JAX config, not an environment variable, so
subprocesses (main.py and the other commands of e2e_util, which also clears
XLA_FLAGS for them) start with one CPU device unless a test asks for more.

Tiers: `python -m pytest -q -m "not slow"` is the fast tier; plain
`python -m pytest -q` runs everything. Mark with @pytest.mark.slow (pytest.ini
registers it; markers are strict) the end-to-end tests, which run main.py,
compare or several processes in subprocesses, and any other test that takes
over ~10 s on a 2-core CPU.

Compile time. Most of the fast tier's time is XLA compiling small
programs. Modules that only check their own numbers opt into the
`fast_compilation` fixture (`pytestmark =
pytest.mark.usefixtures("fast_compilation")`): jax_disable_most_optimizations
for the module, about half the compile time on CPU, with the caches cleared
on the way in and out so that no test inside or outside such a module runs
a program compiled the other way. Every comparison inside a module is then
between programs compiled alike. Tests whose tolerances were measured on
optimised programs (against PyTorch, a training run's accuracy) do not opt
in. Compiled programs are also kept between sessions in JAX's persistent
compilation cache, under pytest's cache folder
(.pytest_cache/d/jax-compilation-cache; `pytest --cache-clear` empties it,
`-p no:cacheprovider` turns it off): a rerun skips most compilation. An
entry is keyed by the program and all compile options, so a hit returns
what compiling would have produced, and JAX still reports it as a
compilation (the recompilation checks of test_train_step are unchanged).

Shared helpers (REPO_ROOT, run_main, read_results, ...) live in
tests/e2e_util.py.
"""

import jax
import pytest

NUM_CPU_DEVICES = 8

try:
  jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
except RuntimeError as error:  # The backend started before this file ran.
  raise RuntimeError(
    "tests/conftest.py must set the CPU device count before JAX starts its "
    "backend, but a JAX operation ran first (in a plugin?)."
  ) from error

# The one-device view (see the module docstring). The originals stay
# reachable for `eight_devices`.
_all_devices = jax.devices
_all_local_devices = jax.local_devices


def _first_device(backend=None):
  return _all_devices(backend)[:1]


def _first_local_device(process_index=None, backend=None, host_id=None):
  return _all_local_devices(process_index, backend, host_id)[:1]


jax.devices = _first_device
jax.local_devices = _first_local_device
jax.device_count = lambda backend=None: len(_first_device(backend))
jax.local_device_count = lambda backend=None: len(
  _first_local_device(backend=backend)
)


def pytest_configure(config):
  """JAX's persistent compilation cache in pytest's cache folder."""
  cache = getattr(config, "cache", None)
  if cache is None:  # -p no:cacheprovider
    return
  jax.config.update(
    "jax_compilation_cache_dir", str(cache.mkdir("jax-compilation-cache"))
  )
  # Every program, however quick to compile: most here take under a second.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def eight_devices() -> list:
  """Eight of the session's fake CPU devices, for in-process meshes."""
  devices = _all_devices("cpu")
  assert len(devices) == NUM_CPU_DEVICES, devices
  return devices[:8]


@pytest.fixture(scope="module")
def fast_compilation():
  """XLA with most optimisations off for one module (see the docstring)."""
  name = "jax_disable_most_optimizations"
  before = jax.config.values[name]
  jax.clear_caches()
  jax.config.update(name, True)
  try:
    yield
  finally:
    jax.config.update(name, before)
    jax.clear_caches()
