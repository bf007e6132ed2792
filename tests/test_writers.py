"""Tests for aikd_jax.writers: console lines, TensorBoard events, progress."""

import io
import json
import logging as std_logging
import os
import struct

import e2e_util as u
import numpy as np
import pytest

from aikd_jax import writers


def _event_files(directory):
  return sorted(
    os.path.join(directory, f)
    for f in os.listdir(directory)
    if f.startswith("events.out.tfevents")
  )


def _read_records(path):
  """Each record's data, with both CRCs checked by tensorboard's own code."""
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

  masked_crc32c = pywrap_tensorflow.masked_crc32c
  with open(path, "rb") as f:
    data = f.read()
  records, i = [], 0
  while i < len(data):
    header = data[i : i + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[i + 8 : i + 12])
    body = data[i + 12 : i + 12 + length]
    (body_crc,) = struct.unpack("<I", data[i + 12 + length : i + 16 + length])
    assert header_crc == masked_crc32c(header)
    assert body_crc == masked_crc32c(body)
    records.append(body)
    i += 16 + length
  assert i == len(data)
  return records


def _read_scalars(path):
  """{tag: [(step, value)]} and the first event, parsed with protobuf."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2
  from tensorboard.util import tensor_util

  # pylint: enable=g-import-not-at-top
  events = [event_pb2.Event.FromString(r) for r in _read_records(path)]
  scalars = {}
  for event in events[1:]:
    for value in event.summary.value:
      if value.HasField("image") or (
        value.metadata.plugin_data.plugin_name == "text"
      ):
        continue
      assert value.metadata.plugin_data.plugin_name == "scalars"
      array = tensor_util.make_ndarray(value.tensor)
      assert array.shape == () and array.dtype == np.float32
      scalars.setdefault(value.tag, []).append((event.step, float(array)))
  return events[0], scalars


WRITTEN = [
  (0, {"loss/ce": 2.302585, "lr": 0.1}),
  (20, {"loss/ce": 1.5, "lr": np.float32(0.1), "train/acc": 0.25}),
  (40, {"loss/ce": float("inf"), "lr": 0.01, "train/acc": np.float64(0.5)}),
  (2**40, {"test/top1_err": 7}),
]


def _expected():
  expected = {}
  for step, scalars in WRITTEN:
    for tag, value in scalars.items():
      expected.setdefault(tag, []).append((step, float(np.float32(value))))
  return expected


def test_scalars_round_trip_through_event_file(tmp_path):
  writer = writers.create_writer(str(tmp_path / "stage"), just_logging=False)
  for step, scalars in WRITTEN:
    writer.write_scalars(step, scalars)
  writer.flush()
  (path,) = _event_files(str(tmp_path / "stage"))
  first, scalars = _read_scalars(path)  # Readable before close: flushed.
  assert first.file_version == "brain.Event:2"
  assert scalars == _expected()
  writer.close()
  assert _read_scalars(path)[1] == _expected()


def test_tensorboard_reads_the_scalars(tmp_path):
  event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
  )
  from tensorboard.util import tensor_util

  writer = writers.create_writer(str(tmp_path), just_logging=False)
  for step, scalars in WRITTEN:
    writer.write_scalars(step, scalars)
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  # Tensor summaries with the scalars plugin, as tf.summary.scalar writes.
  assert sorted(acc.Tags()["tensors"]) == sorted(_expected())
  for tag, expected in _expected().items():
    got = [
      (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
      for e in acc.Tensors(tag)
    ]
    assert got == expected, tag


def test_just_logging_writes_the_log_lines_only(tmp_path, caplog):
  caplog.set_level(std_logging.INFO)
  writer = writers.create_writer(str(tmp_path / "w"), just_logging=True)
  writer.write_scalars(5, {"lr": 0.1, "loss/ce": 1.25, "count": 3})
  writer.flush()
  writer.close()
  assert not os.path.exists(tmp_path / "w")
  # clu's LoggingWriter format: sorted names, floats as .6g.
  assert "[5] count=3, loss/ce=1.25, lr=0.1" in caplog.messages


def test_images_and_config_text_reach_tensorboard(tmp_path):
  event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
  )
  from PIL import Image

  reliability = {
    "counts": [0, 0, 0, 0, 0, 1, 2, 3, 4, 10],
    "accuracy": [0, 0, 0, 0, 0, 1.0, 0.5, 0.67, 0.75, 0.9],
    "confidence": [0, 0, 0, 0, 0, 0.55, 0.65, 0.75, 0.85, 0.97],
  }
  image = writers.reliability_image(reliability, "student, epoch 1")
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  writer = writers.create_writer(str(tmp_path), just_logging=False)
  writer.write_images(7, {"test/reliability": image})
  writer.write_hparams({"lr": 0.1, "model": {"name": "tiny_cnn"}})
  writer.close()
  acc = event_accumulator.EventAccumulator(
    str(tmp_path),
    size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0},
  )
  acc.Reload()
  (event,) = acc.Images("test/reliability")
  assert (event.step, event.height, event.width) == (7, *image.shape[:2])
  decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image)  # PNG is lossless.
  (text,) = acc.Tensors("config")
  assert text.tensor_proto.string_val[0].decode() == (
    "| field | value |\n| --- | --- |\n| `lr` | `0.1` |\n"
    "| `model.name` | `'tiny_cnn'` |\n"
  )


def test_log_file_holds_records_until_opened_then_appends(tmp_path):
  logger = std_logging.getLogger("test_log_file")
  logger.setLevel(std_logging.INFO)
  logger.propagate = False
  path = tmp_path / "log.txt"
  handler = writers.LogFile(str(path), std_logging.Formatter("%(message)s"))
  logger.addHandler(handler)
  try:
    logger.info("before the inputs are checked")
    assert not path.exists()
    writers.open_log_files()
    logger.info("after")
    logger.debug("below INFO: left out")
    assert path.read_text() == "before the inputs are checked\nafter\n"
  finally:
    logger.removeHandler(handler)
    handler.close()
  # A resumed run's handler appends.
  handler = writers.LogFile(str(path), std_logging.Formatter("%(message)s"))
  logger.addHandler(handler)
  logger.info("resumed")
  writers.open_log_files()
  logger.removeHandler(handler)
  handler.close()
  assert path.read_text().splitlines() == [
    "before the inputs are checked",
    "after",
    "resumed",
  ]
  # A handler never opened (a refused run) writes nothing.
  other = tmp_path / "refused" / "log.txt"
  handler = writers.LogFile(str(other), std_logging.Formatter("%(message)s"))
  logger.addHandler(handler)
  logger.info("refused")
  logger.removeHandler(handler)
  handler.close()
  assert not other.parent.exists()


def test_neither_tensorflow_nor_clu_is_imported(tmp_path):
  """In a clean interpreter: create, write, flush, close."""
  code = f"""
import json, sys
import numpy as np
from aikd_jax import writers
w = writers.create_writer({str(tmp_path)!r}, just_logging=False)
for step in range(5):
  w.write_scalars(step, {{'loss/ce': 1.0 / (step + 1)}})
w.write_images(4, {{'img': np.zeros((4, 4, 3), np.uint8)}})
w.write_hparams({{'lr': 0.1}})
w.flush()
w.close()
print(json.dumps(sorted(m for m in sys.modules
                        if m.split('.')[0] in ('tensorflow', 'clu'))))
"""
  proc = u.run_python("-c", code, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
  (path,) = _event_files(str(tmp_path))
  scalars = _read_scalars(path)[1]
  assert [s for s, _ in scalars["loss/ce"]] == [0, 1, 2, 3, 4]
  assert sorted(scalars) == ["loss/ce"]


@pytest.mark.slow
def test_a_digits_run_imports_neither_tensorflow_nor_clu(tmp_path):
  """main.py's whole path, teacher and student stages, in a clean interpreter
  where TensorFlow may well be installed: it is never imported."""
  workdir = str(tmp_path / "run")
  code = f"""
import json, runpy, sys
sys.argv = ["main.py", "--config=configs/digits.py", "--workdir={workdir}",
            "--config.num_epochs=1", "--config.teacher_num_epochs=1"]
try:
  runpy.run_path("main.py", run_name="__main__")
except SystemExit as stop:
  assert stop.code == 0, stop.code
print(json.dumps(sorted(m for m in sys.modules
                        if m.split('.')[0] in ('tensorflow', 'clu'))))
"""
  proc = u.run_python("-c", code, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
  with open(os.path.join(workdir, "student", "results.json")) as f:
    results = json.load(f)
  assert results["complete"] and results["num_epochs"] == 1
  assert os.path.getsize(os.path.join(workdir, "log.txt")) > 0
