"""The persistent compilation cache's folder, and that a set one is kept."""

import os

import jax
import pytest

from aikd_jax import compilation_cache


def test_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.cache_dir("default") == os.path.join(
    str(tmp_path), "aikd_jax", "jax"
  )
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compilation_cache.cache_dir("default") == os.path.join(
    os.path.expanduser("~"), ".cache", "aikd_jax", "jax"
  )
  assert compilation_cache.cache_dir("") is None
  assert compilation_cache.cache_dir("~/x") == os.path.expanduser("~/x")


@pytest.fixture
def no_cache():
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", saved)


def test_enable_sets_creates_and_keeps_an_existing_cache(no_cache, tmp_path):
  assert compilation_cache.enable("") is None
  assert not jax.config.jax_compilation_cache_dir
  folder = str(tmp_path / "cache")
  assert compilation_cache.enable(folder) == folder
  assert os.path.isdir(folder)
  assert jax.config.jax_compilation_cache_dir == folder
  # One already set (e.g. JAX_COMPILATION_CACHE_DIR) wins over the config.
  assert compilation_cache.enable(str(tmp_path / "other")) == folder
  assert not os.path.exists(tmp_path / "other")


def test_a_folder_that_cannot_exist_leaves_the_cache_off(no_cache, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert compilation_cache.enable(str(blocker / "cache")) is None
  assert not jax.config.jax_compilation_cache_dir
