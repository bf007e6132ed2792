"""Metric writers and the run's log file, without TensorFlow or clu.

Training runs entirely in JAX, so its metrics should not need TensorFlow
either. clu's writers do (`clu.metric_writers` imports its TF summary writer
at import time); this module stands in for the parts the trainer uses, with
no dependency beyond absl (Pillow and matplotlib, imported when an image is
written):

* `create_writer(workdir, just_logging, console)`: scalars to the console
  (the lines clu's LoggingWriter writes, "[step] name=value, ...") unless not
  `console`, and, unless `just_logging`, to a TensorBoard event file in
  `workdir`: scalars as `tf.summary.scalar` writes them (a float32 tensor with
  the "scalars" plugin's metadata), images as PNG image summaries, text
  (the config) as the "text" plugin's string tensors.
* `reliability_image`: a reliability diagram drawn as an RGB array.
* `LogFile`: a logging handler that copies the console log to a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import itertools
import logging as std_logging
import math
import os
import socket
import struct
import threading
import time
from typing import Any
import weakref

from absl import logging

# TensorBoard lists its runs by file names starting "events.out.tfevents".
_EVENT_FILE_PREFIX = "events.out.tfevents"
_FLUSH_SECS = 30.0  # A write this long after the last flush flushes (TF: 120).
_file_ids = itertools.count()


def create_writer(
  workdir: str, just_logging: bool, console: bool = True
) -> "MultiWriter":
  """Console logging (if `console`), plus TensorBoard event files in
  `workdir` if not `just_logging` (for processes other than 0 of a
  multi-process run)."""
  writers = [LoggingWriter()] if console else []
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

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    del step, texts  # Long; the event file and config.json keep them.

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
    """Each image: uint8 [H, W, C] with C = 1, 3 or 4, stored as a PNG."""
    wall_time = time.time()
    for tag, image in images.items():
      self._write_event(
        _event(wall_time, step, summary=_image_summary(tag, image))
      )
    self.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown text, shown in TensorBoard's Text tab."""
    wall_time = time.time()
    for tag, text in texts.items():
      self._write_event(
        _event(wall_time, step, summary=_text_summary(tag, text))
      )
    self.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The hyperparameters as a markdown table under the tag "config";
    nested mappings are flattened to dotted names."""
    rows = "".join(
      f"| `{name}` | `{value!r}` |\n"
      for name, value in sorted(_flatten(hparams).items())
    )
    self.write_texts(0, {"config": "| field | value |\n| --- | --- |\n" + rows})

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

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for w in self._writers:
      w.write_texts(step, texts)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


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


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for name, value in mapping.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{name}."))
    else:
      flat[f"{prefix}{name}"] = value
  return flat


def _image_summary(tag: str, image: Any) -> bytes:
  """A `Summary` of one PNG image, as `tf.compat.v1.summary.image` writes it.

  Summary.value = 1 {tag = 1, image = 4 {height = 1, width = 2, colorspace =
  3, encoded_image_string = 4}}; TensorBoard's images plugin reads it.
  """
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  array = np.asarray(image)
  if (
    array.dtype != np.uint8
    or array.ndim != 3
    or array.shape[-1]
    not in (
      1,
      3,
      4,
    )
  ):
    raise ValueError(
      f"{tag}: images must be uint8 [H, W, C] with C in (1, 3, 4), got "
      f"{array.dtype} {array.shape}."
    )
  height, width, channels = array.shape
  png = io.BytesIO()
  Image.fromarray(array[..., 0] if channels == 1 else array).save(
    png, format="PNG"
  )
  image_msg = (
    _key(1, 0)
    + _varint(height)
    + _key(2, 0)
    + _varint(width)
    + _key(3, 0)
    + _varint(channels)
    + _bytes_field(4, png.getvalue())
  )
  return _bytes_field(
    1, _bytes_field(1, tag.encode()) + _bytes_field(4, image_msg)
  )


_DT_STRING = 7


def _text_summary(tag: str, text: str) -> bytes:
  """A `Summary` of one string, as `tf.summary.text` writes it.

  TensorProto {dtype = 1 (DT_STRING), tensor_shape = 2 (a scalar),
  string_val = 8}; SummaryMetadata {plugin_data = 1 {plugin_name = "text"}}.
  """
  tensor = (
    _key(1, 0)
    + _varint(_DT_STRING)
    + _bytes_field(2, b"")
    + _bytes_field(8, text.encode())
  )
  metadata = _bytes_field(1, _bytes_field(1, b"text"))
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


# ---------------------------------------------------------------------------
# Figures and the log file.


def reliability_image(reliability: Mapping[str, Any], title: str) -> Any:
  """A reliability diagram (metrics.reliability_diagram) as uint8 [H, W, 3].

  Bars: each confidence bin's accuracy; red lines: its mean confidence; the
  diagonal is perfect calibration. Empty bins are left out.
  """
  # pylint: disable=g-import-not-at-top
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  import numpy as np

  # pylint: enable=g-import-not-at-top
  counts = np.asarray(reliability["counts"])
  accuracy = np.asarray(reliability["accuracy"])
  confidence = np.asarray(reliability["confidence"])
  edges = np.linspace(0.0, 1.0, len(counts) + 1)
  present = counts > 0
  fig = Figure(figsize=(4, 4), dpi=80)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.bar(
    ((edges[:-1] + edges[1:]) / 2)[present],
    accuracy[present],
    width=1.0 / len(counts),
    color="tab:blue",
    edgecolor="black",
    linewidth=0.6,
    label="accuracy",
  )
  ax.hlines(
    confidence[present],
    edges[:-1][present],
    edges[1:][present],
    colors="tab:red",
    linewidth=2.0,
    label="mean confidence",
  )
  ax.plot([0, 1], [0, 1], "--", color="gray")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="upper left", fontsize=7)
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class LogFile(std_logging.Handler):
  """Appends every log record to `path`, from when `open_log_files()` is
  called on.

  A run's inputs are checked before anything is written to its workdir; until
  then the records wait in memory, so the file still starts with the run's
  first line, and a refused run leaves the workdir as it was.
  """

  def __init__(self, path: str, formatter: std_logging.Formatter):
    super().__init__(std_logging.INFO)
    self.path = path
    self.setFormatter(formatter)
    self._file = None
    self._waiting: list[str] = []
    _log_files.add(self)

  def open(self) -> None:
    """Creates or appends to the file; writes the records held so far."""
    with self.lock:
      if self._file is None:
        self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        self._file.writelines(self._waiting)
        self._file.flush()
        self._waiting = []

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      line = self.format(record) + "\n"
      if self._file is None:
        self._waiting.append(line)
      else:
        self._file.write(line)
        self._file.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def close(self) -> None:
    with self.lock:
      if self._file is not None:
        self._file.close()
      _log_files.discard(self)
    super().close()


_log_files: weakref.WeakSet = weakref.WeakSet()


def open_log_files() -> None:
  """Starts every LogFile writing: call once the run's inputs are checked
  and its workdir exists."""
  for handler in list(_log_files):
    handler.open()
