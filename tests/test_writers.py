"""Tests for aikd_jax.writers: console lines, TensorBoard events, progress."""

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


def test_report_progress_logs_rate_eta_and_parts(caplog):
  caplog.set_level(std_logging.INFO)

  class Recorder:
    def __init__(self):
      self.written = []

    def write_scalars(self, step, scalars):
      self.written.append((step, dict(scalars)))

  recorder = Recorder()
  report = writers.ReportProgress(
    num_train_steps=1000, writer=recorder, every_steps=100, every_secs=None
  )
  assert not report(0, t=0.0)  # The first call never reports.
  for step in range(1, 100):
    assert not report(step, t=step / 50)
  with report.timed("eval", wait_jax_async_dispatch=False):
    pass
  assert report(100, t=2.0)
  (step, rate), (step2, uptime) = recorder.written
  assert step == step2 == 100
  assert rate == {"steps_per_sec": pytest.approx(50.0)}
  assert uptime["uptime"] >= 0.0
  notes = [m for m in caplog.messages if m.startswith("Setting work unit")]
  assert notes[-1].startswith(
    "Setting work unit notes: 50.0 steps/s, 10.0% (100/1000), ETA: 0m ("
  )
  assert notes[-1].endswith("% eval)")
  with pytest.raises(ValueError):
    report(102, t=3.0)  # Skipped a step.


def test_report_progress_reports_the_last_step_and_slow_intervals():
  report = writers.ReportProgress(
    num_train_steps=7, every_steps=5, every_secs=60.0
  )
  triggered = [step for step in range(8) if report(step, t=step * 1.0)]
  assert triggered == [5, 7]
  report = writers.ReportProgress(
    num_train_steps=None, every_steps=None, every_secs=10.0
  )
  triggered = [step for step in range(40) if report(step, t=step * 4.0)]
  assert triggered == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39]
  # pylint: disable=protected-access
  assert writers._format_secs(123456.7) == "1d10h17m"
  assert writers._format_secs(59) == "0m"
  # pylint: enable=protected-access


def test_timed_waits_for_jax_work():
  report = writers.ReportProgress(num_train_steps=10, every_steps=5)
  with report.timed("eval"):
    pass
  # pylint: disable=protected-access
  report._executor.shutdown(wait=True)
  assert report._time_per_part["eval"] >= 0.0
  # pylint: enable=protected-access


def test_neither_tensorflow_nor_clu_is_imported(tmp_path):
  """In a clean interpreter: create, write, report, time, flush, close."""
  code = f"""
import json, sys
from aikd_jax import writers
w = writers.create_writer({str(tmp_path)!r}, just_logging=False)
r = writers.ReportProgress(num_train_steps=4, writer=w, every_steps=2)
for step in range(5):
  r(step)
  w.write_scalars(step, {{'loss/ce': 1.0 / (step + 1)}})
with r.timed('eval'):
  pass
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
  assert [s for s, _ in scalars["steps_per_sec"]] == [2, 4]
