"""Metric writers and progress reports without TensorFlow or clu.

Training runs entirely in JAX, so its metrics should not need TensorFlow
either. clu's writers do (`clu.metric_writers` imports its TF summary writer
at import time, and `clu.periodic_actions` imports `clu.metric_writers`);
this module stands in for the parts the trainer uses, with no dependency
beyond absl (and jax, for `ReportProgress.timed`):

* `create_writer(workdir, just_logging)`: scalars to the console (the lines
  clu's LoggingWriter writes, "[step] name=value, ...") and, unless
  `just_logging`, to a TensorBoard event file in `workdir`, encoded here
  as `tf.summary.scalar` writes them (a float32 tensor with the "scalars"
  plugin's metadata), so TensorBoard reads them as before.
* `ReportProgress`: clu's ReportProgress, same arguments, same `report(step)`
  and `with report.timed("eval"):`, same log line and scalars (steps_per_sec,
  uptime).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
import concurrent.futures
import contextlib
import itertools
import math
import os
import socket
import struct
import threading
import time
from typing import Any

from absl import logging

# TensorBoard lists its runs by file names starting "events.out.tfevents".
_EVENT_FILE_PREFIX = "events.out.tfevents"
_FLUSH_SECS = 30.0  # A write this long after the last flush flushes (TF: 120).
_file_ids = itertools.count()


def create_writer(workdir: str, just_logging: bool) -> "MultiWriter":
  """Console logging, plus TensorBoard event files in `workdir` if not
  `just_logging` (for processes other than 0 of a multi-process run)."""
  writers = [LoggingWriter()]
  if not just_logging:
    writers.append(EventFileWriter(workdir))
  return MultiWriter(writers)


class LoggingWriter:
  """Writes to the INFO log, in the format of clu's LoggingWriter."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [
      f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in sorted(scalars.items())
    ]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    logging.info(
      "[%d] Got images: %s.",
      step,
      {k: getattr(v, "shape", None) for k, v in images.items()},
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", hparams)

  def flush(self) -> None:
    logging.flush()

  def close(self) -> None:
    self.flush()


class EventFileWriter:
  """Writes scalars to a new TensorBoard event file in `logdir`.

  The file holds TFRecord records of `Event` protocol buffers, encoded here
  by hand (only the fields a scalar needs) so that neither TensorFlow nor
  tensorboard nor protobuf has to be installed where training runs.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (
      f"{_EVENT_FILE_PREFIX}.{int(time.time()):010d}."
      f"{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}.v2"
    )
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._lock = threading.Lock()
    self._last_flush = time.monotonic()
    self._write_event(_event(time.time(), 0, file_version="brain.Event:2"))
    self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    wall_time = time.time()
    for tag, value in scalars.items():
      self._write_event(
        _event(wall_time, step, summary=_scalar_summary(tag, float(value)))
      )
    if time.monotonic() - self._last_flush > _FLUSH_SECS:
      self.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images
    logging.log_first_n(
      logging.WARNING,
      "EventFileWriter writes scalars only; images go to the log alone.",
      1,
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams
    logging.log_first_n(
      logging.WARNING,
      "EventFileWriter writes scalars "
      "only; hyperparameters go to the log alone.",
      1,
    )

  def flush(self) -> None:
    with self._lock:
      if not self._file.closed:
        self._file.flush()
      self._last_flush = time.monotonic()

  def close(self) -> None:
    with self._lock:
      self._file.close()

  def _write_event(self, event: bytes) -> None:
    header = struct.pack("<Q", len(event))
    record = (
      header
      + struct.pack("<I", _masked_crc32c(header))
      + event
      + struct.pack("<I", _masked_crc32c(event))
    )
    with self._lock:
      self._file.write(record)


class MultiWriter:
  """Passes every call on to each of `writers`."""

  def __init__(self, writers: Iterable[Any]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_images(step, images)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


class ReportProgress:
  """Logs steps/s, the share done and the ETA; clu's ReportProgress.

  Call `report(step)` after every training step; it reports when `step` is a
  multiple of `every_steps`, when `every_secs` have passed since the last
  report, and at `num_train_steps`, but never on its first call. Parts of the
  loop timed with `with report.timed("eval"):` get their share of the
  elapsed time in the log line.
  """

  def __init__(
    self,
    *,
    num_train_steps: int | None = None,
    writer: Any = None,
    every_steps: int | None = None,
    every_secs: float | None = 60.0,
    on_steps: Iterable[int] | None = None,
  ):
    self._on_steps = set(on_steps or [])
    if num_train_steps is not None:
      self._on_steps.add(num_train_steps)
    if num_train_steps is not None and num_train_steps < 0:
      num_train_steps = None
    self._num_train_steps = num_train_steps
    self._writer = writer
    self._every_steps = every_steps
    self._every_secs = every_secs
    self._previous_step = self._previous_time = self._last_step = None
    self._time_per_part = collections.defaultdict(float)
    self._t0 = time.monotonic()
    # One worker: the timing barriers of `timed` are waited for in order.
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Returns whether it reported at this step."""
    t = time.monotonic() if t is None else t
    if self._previous_step is None:
      self._previous_step, self._previous_time = step, t
    elif self._every_steps is not None and step - self._last_step != 1:
      raise ValueError(
        f"ReportProgress must be called after every step once (every_steps"
        f"={self._every_steps}, previous_step={self._previous_step}, "
        f"step={step})."
      )
    self._last_step = step
    if step == self._previous_step or not self._should_report(step, t):
      return False
    self._report(step, t)
    self._previous_step, self._previous_time = step, t
    return True

  @contextlib.contextmanager
  def timed(self, name: str, wait_jax_async_dispatch: bool = True):
    """Adds the time spent in the block to part `name`.

    With `wait_jax_async_dispatch`, the time is that of the JAX computations
    dispatched inside the block: from when those dispatched before it have
    finished to when those dispatched inside it have (measured on a helper
    thread, so the block itself does not wait).
    """
    if not wait_jax_async_dispatch:
      start = time.monotonic()
      yield
      self._time_per_part[name] += time.monotonic() - start
      return

    def start_measurement(barrier) -> float:
      barrier.block_until_ready()
      return time.monotonic()

    def stop_measurement(start_future, barrier) -> None:
      barrier.block_until_ready()
      self._time_per_part[name] += time.monotonic() - start_future.result()

    start_future = self._executor.submit(start_measurement, _barrier())
    yield
    self._executor.submit(stop_measurement, start_future, _barrier())

  def _should_report(self, step: int, t: float) -> bool:
    return (
      (self._every_steps is not None and step % self._every_steps == 0)
      or (
        self._every_secs is not None
        and t - self._previous_time > self._every_secs
      )
      or step in self._on_steps
    )

  def _report(self, step: int, t: float) -> None:
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
    message = f"{steps_per_sec:.1f} steps/s"
    if self._num_train_steps:
      eta_seconds = (self._num_train_steps - step) / steps_per_sec
      message += (
        f", {100 * step / self._num_train_steps:.1f}% "
        f"({step}/{self._num_train_steps}), "
        f"ETA: {_format_secs(eta_seconds)}"
      )
    if self._time_per_part:
      total = time.monotonic() - self._t0
      message += " ({} : {})".format(
        _format_secs(total),
        ", ".join(
          f"{100 * dt / total:.1f}% {name}"
          for name, dt in sorted(self._time_per_part.items())
        ),
      )
    logging.info("Setting work unit notes: %s", message)  # clu's wording.
    if self._writer is not None:
      self._writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
      self._writer.write_scalars(step, {"uptime": time.monotonic() - self._t0})


def _format_secs(secs: float) -> str:
  """123456.7 -> "1d10h17m" (clu's format)."""
  s = ""
  days = int(secs / (3600 * 24))
  secs -= days * 3600 * 24
  if days:
    s += f"{days}d"
  hours = int(secs / 3600)
  secs -= hours * 3600
  if hours:
    s += f"{hours}h"
  return s + f"{int(secs / 60)}m"


_square = None


def _barrier():
  """A tiny JAX computation, dispatched after everything dispatched so far."""
  global _square
  if _square is None:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    _square = (jax.jit(lambda x: x**2), jnp)
  square, jnp = _square
  return square(jnp.array(0.0))


# ---------------------------------------------------------------------------
# Protocol buffer encoding of the few messages a scalar event needs
# (tensorboard/compat/proto: event.proto, summary.proto, tensor.proto).

_DT_FLOAT = 1


def _event(
  wall_time: float,
  step: int,
  *,
  file_version: str | None = None,
  summary: bytes | None = None,
) -> bytes:
  """An `Event`: wall_time = 1 (double), step = 2, file_version = 3,
  summary = 5."""
  out = _key(1, 1) + struct.pack("<d", wall_time)
  if step:
    out += _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


def _scalar_summary(tag: str, value: float) -> bytes:
  """A `Summary` of one value, as `tf.summary.scalar` writes it.

  Summary.value = 1 {tag = 1, tensor = 8, metadata = 9}; TensorProto {dtype =
  1, tensor_shape = 2 (empty: a scalar), tensor_content = 4 (little-endian
  float32)}; SummaryMetadata {plugin_data = 1 {plugin_name = 1}}. The same
  bytes as TensorFlow 2.21's.
  """
  tensor = (
    _key(1, 0)
    + _varint(_DT_FLOAT)
    + _bytes_field(2, b"")
    + _bytes_field(4, _float32_bytes(value))
  )
  metadata = _bytes_field(1, _bytes_field(1, b"scalars"))
  value_msg = (
    _bytes_field(1, tag.encode())
    + _bytes_field(8, tensor)
    + _bytes_field(9, metadata)
  )
  return _bytes_field(1, value_msg)


def _float32_bytes(value: float) -> bytes:
  """Little-endian float32; beyond its range, +-inf (as NumPy casts)."""
  try:
    return struct.pack("<f", value)
  except OverflowError:
    return struct.pack("<f", math.copysign(math.inf, value))


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # Negative int64s take ten bytes, as in protobuf.
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


# TFRecord framing: each record's length and data carry a masked CRC-32C.


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
