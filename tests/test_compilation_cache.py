"""The persistent compilation cache's folder, and that a set one is kept."""

import os

import e2e_util as u
import jax
import pytest

from aikd_jax import banks
from aikd_jax import checkpointing
from aikd_jax import compilation_cache
from aikd_jax import data as data_lib
from aikd_jax import device_data
from aikd_jax import run_config
from aikd_jax import stage as stage_lib
from aikd_jax import teacher_logits
from aikd_jax import train_step as step_lib


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


# --- a resumed run compiles the program a fresh one did ---------------------


def _stage_and_data():
  config = u.digits_config(method="ai_kd", num_epochs=1)
  mesh = banks.data_mesh()
  data = device_data.place_dataset(
    data_lib.load_dataset("digits"), mesh, config
  )
  objective = run_config.objective_from_config(config)
  stage = stage_lib.build_stage(
    "student", objective, 1, config, data, mesh.devices.size
  )
  return config, stage, data, mesh


def _program(stage, mesh, state, step_data) -> str:
  return (
    stage_lib.make_train_step(stage, mesh).lower(state, step_data).as_text()
  )


def test_restored_state_and_teacher_bank_give_the_fresh_runs_program(tmp_path):
  """A cache entry is keyed on the program: a restored state or a loaded
  teacher-logit bank with another dtype weakness or sharding than the fresh
  ones would make every resumed run compile again."""
  config, stage, data, mesh = _stage_and_data()
  fresh = stage_lib.create_train_state(stage, data, mesh)
  checkpoints = checkpointing.StageCheckpoints(str(tmp_path / "ckpt"), keep=1)
  checkpoints.save(0, fresh, {})
  checkpoints.wait()
  restored, _ = checkpoints.restore(
    0, stage_lib.create_train_state(stage, data, mesh)
  )
  checkpoints.close()

  # The teacher-logit bank as stage 2 computes it, then as it loads it.
  teacher = stage_lib.create_train_state(stage, data, mesh).student
  banks_by_path = [
    teacher_logits.compute_or_load(
      stage, teacher, config, data, mesh, str(tmp_path)
    )
    for _ in range(2)
  ]
  assert banks_by_path[0].sharding == banks_by_path[1].sharding
  programs = [
    _program(
      stage,
      mesh,
      state,
      stage_lib.step_data(stage, data, mesh, 0, step_lib.Teacher(logits=bank)),
    )
    for state, bank in zip((fresh, restored), banks_by_path)
  ]
  assert programs[0] == programs[1]
