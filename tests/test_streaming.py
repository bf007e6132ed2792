"""The streamed input pipeline against the device-resident one.

With the device-side augmentation, a streamed batch holds exactly the rows
the device-resident step would have read, so every number must agree bit
for bit: the trained state, the banks, the teacher's logits and the test
logits. The stage is driven directly (as train.py does) on the digits data
with the tiny CNN, on one device and on eight fake ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from test_train_step import bank_sized_collectives

from aikd_jax import banks
from aikd_jax import data as data_lib
from aikd_jax import host_augment
from aikd_jax import input_pipeline
from aikd_jax import run_config
from aikd_jax import stage as stage_lib
from aikd_jax import streaming
from aikd_jax import train
from aikd_jax import train_step as step_lib
from aikd_jax.device_data import place_dataset
from configs import digits

# Every comparison here is between programs compiled alike.
pytestmark = pytest.mark.usefixtures("fast_compilation")


def _config(method="ai_kd", batch_size=64):
  config = digits.get_config()
  config.method = method
  config.batch_size = batch_size
  config.eval_batch_size = 128
  config.num_epochs = 2
  config.stream_workers = 2
  return config


@pytest.fixture(scope="module")
def dataset():
  return data_lib.load_dataset("digits")


def _open(dataset, mesh, config, mode):
  if mode == "device":
    return place_dataset(dataset, mesh, config)
  return input_pipeline.stream_arrays(dataset, mesh, config)


def _stage(config, data, mesh):
  objective = run_config.objective_from_config(config)
  return stage_lib.build_stage(
    "student", objective, config.num_epochs, config, data, mesh.devices.size
  )


def _teacher(stage, data, mesh, config):
  """A 'pre-trained model': the freshly initialised student's eval logits,
  computed through the pipeline under test."""
  variables = stage_lib.create_train_state(stage, data, mesh).student.variables
  predict = stage_lib.make_predict_fn(stage, data, mesh, config.eval_batch_size)
  logits = input_pipeline.train_logits_by_id(
    predict, variables, data, mesh, config.eval_batch_size
  )
  return step_lib.Teacher(logits=logits)


def _train(
  stage, data, mesh, teacher, *, state=None, start=0, stop=None, step_fn=None
):
  """Steps [start, stop) as train.py's loop runs them; the state on host."""
  if state is None:
    state = stage_lib.create_train_state(stage, data, mesh)
  else:
    state = jax.device_put(
      state,
      jax.tree.map(
        lambda x: x.sharding,
        stage_lib.create_train_state(stage, data, mesh),
      ),
    )
  stop = stage.total_steps if stop is None else stop
  step_fn = step_fn or stage_lib.make_train_step(stage, mesh)
  step = start
  for epoch in range(start // stage.steps_per_epoch, stage.num_epochs):
    step_data = stage_lib.step_data(stage, data, mesh, epoch, teacher)
    feed = input_pipeline.feed(step_data, stage, data, mesh, epoch, step)
    while step < min((epoch + 1) * stage.steps_per_epoch, stop):
      state, _ = step_fn(state, next(feed))
      step += 1
  return jax.device_get(state)


def _assert_bitwise_equal(a, b):
  """Every array of two states equal (their modules are distinct objects)."""
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
    )


def _run_both(dataset, mesh, config):
  out = {}
  for mode in ("device", "stream"):
    data = _open(dataset, mesh, config, mode)
    stage = _stage(config, data, mesh)
    teacher = _teacher(stage, data, mesh, config)
    state = _train(stage, data, mesh, teacher)
    predict = stage_lib.make_predict_fn(
      stage, data, mesh, config.eval_batch_size
    )
    test = input_pipeline.test_logits(
      predict, state.student.variables, data, mesh, config.eval_batch_size
    )
    out[mode] = dict(
      state=state, teacher=np.asarray(teacher.logits), test=test, stage=stage
    )
  return out


def test_streamed_training_equals_device_resident_bitwise(dataset):
  """Two epochs of AI-KD (precomputed teacher, banks, discriminator)."""
  mesh = banks.data_mesh(jax.devices()[:1])
  out = _run_both(dataset, mesh, _config())
  device, stream = out["device"], out["stream"]
  assert int(stream["state"].student.step) == device["stage"].total_steps
  np.testing.assert_array_equal(stream["teacher"], device["teacher"])
  np.testing.assert_array_equal(stream["test"], device["test"])
  _assert_bitwise_equal(stream["state"], device["state"])
  # The run moved: the bank is no longer the one-hot labels it started as.
  initial = np.asarray(
    stage_lib.create_train_state(
      device["stage"],
      _open(dataset, mesh, _config(), "device"),
      mesh,
    ).prediction_bank
  )
  assert not np.array_equal(
    np.asarray(device["state"].prediction_bank), initial
  )


@pytest.mark.slow  # about 40 s on a 2-core CPU
def test_eight_devices_streamed_equals_device_resident(dataset, eight_devices):
  mesh = banks.data_mesh(eight_devices)
  out = _run_both(dataset, mesh, _config(batch_size=64))
  np.testing.assert_array_equal(
    out["stream"]["teacher"], out["device"]["teacher"]
  )
  np.testing.assert_array_equal(out["stream"]["test"], out["device"]["test"])
  _assert_bitwise_equal(out["stream"]["state"], out["device"]["state"])


@pytest.mark.slow  # the precomputed teacher's twin stays in the fast tier
def test_streamed_online_teacher_equals_device_resident(dataset):
  """AI-KD with an online teacher: it sees the streamed views."""
  mesh = banks.data_mesh(jax.devices()[:1])
  config = _config()
  config.teacher_mode = "online"
  states = []
  for mode in ("device", "stream"):
    data = _open(dataset, mesh, config, mode)
    stage = _stage(config, data, mesh)
    assert stage.teacher_model is not None
    # Another seed's initial model as the teacher, so it differs from the
    # student.
    other = dataclasses.replace(stage, seed=stage.seed + 1)
    variables = stage_lib.create_train_state(other, data, mesh).student
    teacher = step_lib.Teacher(variables=variables.variables)
    states.append(_train(stage, data, mesh, teacher))
  _assert_bitwise_equal(states[1], states[0])


def test_each_device_receives_only_its_own_rows(dataset, eight_devices):
  mesh = banks.data_mesh(eight_devices)
  config = _config(batch_size=64)
  data = _open(dataset, mesh, config, "stream")
  stage = _stage(config, data, mesh)
  b, s = stage.step_config.per_device_batch, data.layout.rows_per_device
  order = banks.epoch_order(data.layout, stage.seed, 1)
  labels_by_id = data.train_labels_by_id
  images_by_id = banks.arrange_by_id(
    dataset.train_images,
    banks.example_ids(len(dataset.train_labels), config.seed),
    data.layout.num_rows,
  )
  batches = streaming.train_batches(
    data,
    mesh,
    seed=stage.seed,
    epoch=1,
    first_step=3,
    steps_per_epoch=stage.steps_per_epoch,
    per_device_batch=b,
    image_size=data.image_shape[0],
    flip=False,
  )
  count = 0
  for k, batch in enumerate(batches, start=3):
    for field in (batch.images, batch.labels, batch.rows):
      assert len(field.addressable_shards) == 8
      for shard in field.addressable_shards:
        assert shard.device == eight_devices[shard.index[0].start // b]
    for shard in batch.rows.addressable_shards:
      d = shard.index[0].start // b
      rows = np.asarray(shard.data)
      want = order[d * s + k * b : d * s + (k + 1) * b]
      np.testing.assert_array_equal(rows, want)
      assert rows.max() < data.layout.valid_rows(d)
      ids = rows + d * s
      np.testing.assert_array_equal(
        np.asarray(batch.labels)[d * b : (d + 1) * b], labels_by_id[ids]
      )
      np.testing.assert_array_equal(
        np.asarray(batch.images)[d * b : (d + 1) * b], images_by_id[ids]
      )
    count += 1
  assert count == stage.steps_per_epoch - 3


def test_streamed_step_hlo_moves_no_bank(dataset, eight_devices):
  mesh = banks.data_mesh(eight_devices)
  config = _config(batch_size=64)
  data = _open(dataset, mesh, config, "stream")
  stage = _stage(config, data, mesh)
  teacher = step_lib.Teacher(
    logits=banks.put_sharded(
      np.zeros((data.layout.num_rows, data.num_classes), np.float32), mesh
    )
  )
  step_data = stage_lib.step_data(stage, data, mesh, 0, teacher)
  feed = input_pipeline.feed(step_data, stage, data, mesh, 0, 0)
  state = stage_lib.create_train_state(stage, data, mesh)
  step_fn = stage_lib.make_train_step(stage, mesh)
  hlo = step_fn.lower(state, next(feed)).compile().as_text()
  assert "all-reduce" in hlo  # the gradients are averaged
  bad = bank_sized_collectives(hlo, data.layout.num_rows, data.num_classes)
  assert not bad, bad


def test_resume_mid_epoch_equals_an_uninterrupted_run(dataset):
  mesh = banks.data_mesh(jax.devices()[:1])
  config = _config(method="ps_kd")
  data = _open(dataset, mesh, config, "stream")
  stage = _stage(config, data, mesh)
  train = functools.partial(
    _train,
    stage,
    data,
    mesh,
    None,
    step_fn=stage_lib.make_train_step(stage, mesh),
  )
  whole = train()
  stop = stage.steps_per_epoch + 5  # mid-way through epoch 1
  first = train(stop=stop)
  assert int(first.student.step) == stop
  resumed = train(state=first, start=stop)
  _assert_bitwise_equal(resumed, whole)
  # A feed that started one step off would not match.
  wrong = train(state=first, start=stop - 1)
  assert not all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(
      jax.tree.leaves(wrong.student.params),
      jax.tree.leaves(whole.student.params),
    )
  )


# --- host augmentation, the ImageNet config, bad configs ---------------------


def test_host_views_are_keyed_by_seed_step_and_id():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  view = lambda *key: host_augment.train_view(
    image, 16, host_augment.view_rng(*key), flip=True
  )
  assert view(0, 5, 7).shape == (16, 16, 3)
  np.testing.assert_array_equal(view(0, 5, 7), view(0, 5, 7))
  for other in ((1, 5, 7), (0, 6, 7), (0, 5, 8)):
    assert not np.array_equal(view(*other), view(0, 5, 7))
  assert host_augment.eval_view(image, 16).shape == (16, 16, 3)
  rng = np.random.default_rng(1)
  for _ in range(200):
    top, left, h, w = host_augment.crop_box(40, 60, rng)
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
    assert h > 0 and w > 0


@pytest.mark.slow  # about 30 s: three stages, compiled once each
def test_imagenet_config_dry_run_on_mock_tfds(tmp_path):
  """The ImageNet config end to end on TFDS's fake imagenet2012 (random
  images of random sizes, read through tfds.data_source), shrunk to the
  tiny CNN at 16x16."""
  import tensorflow_datasets as tfds

  from configs import imagenet_resnet152

  config = imagenet_resnet152.get_config()
  config.model = "tiny_cnn"
  config.image_size = 16
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = 2
  config.teacher_num_epochs = 1
  config.stream_workers = 2
  config.compilation_cache_dir = ""
  with tfds.testing.mock_data(
    num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["complete"] and len(results["history"]) == 2
  assert np.isfinite(results["last"]["nll"])
  saved = run_config.saved_config(str(tmp_path / "run"))
  assert saved["input_pipeline"] == "stream" and saved["host_augment"]
  assert saved["host_color_augment"]


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"input_pipeline": "disk"}, "input_pipeline must be one of"),
    ({"device_data_budget_gb": 0.0}, "device_data_budget_gb must be"),
    ({"stream_workers": 0}, "stream_workers must be positive"),
    (
      {"host_augment": True, "input_pipeline": "device"},
      "host_augment crops on the host",
    ),
    ({"host_augment": True, "image_size": 0}, "set --config.image_size"),
    ({"host_color_augment": True}, "needs host_augment=True"),
    (
      {"method": "cs_kd", "input_pipeline": "stream"},
      "streamed batches do not carry",
    ),
    ({"dataset": "tfds:"}, "tfds:"),
  ],
)
def test_bad_streaming_config_is_refused_in_one_line(changes, message):
  config = digits.get_config()
  config.update(changes)
  with pytest.raises((run_config.ConfigError, ValueError)) as error:
    run_config.validate(config)
    data_lib.check_dataset_available(config.dataset)
  assert message in str(error.value)
  assert "\n" not in str(error.value)
