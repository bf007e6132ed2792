"""Files a run leaves for people and tools: written atomically, read back.

A stage's results file is the one record that it finished; the trainer,
the comparison and the report all decide "finished" with `finished_results`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

RESULTS_FILE = "results.json"


def write_text(path: str, text: str) -> None:
  """Writes `path` so a reader never sees it half-written (a crash too).

  The text goes to a uniquely named file beside `path`, flushed to disk,
  then renamed over it; on any failure (a full disk) the temporary file is
  removed and `path` is as it was.
  """
  fd, tmp = tempfile.mkstemp(
    prefix=f".{os.path.basename(path)}.",
    suffix=".tmp",
    dir=os.path.dirname(path) or ".",
  )
  try:
    with os.fdopen(fd, "w", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_json(path: str, payload: Any, **dump_args: Any) -> None:
  write_text(path, json.dumps(payload, indent=2, **dump_args))


def read_json(path: str) -> Any | None:
  """The file's content, or None when it does not exist."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_results(
  stage_dir: str, num_epochs: int | None = None
) -> dict | None:
  """A stage's results if it finished (with at least `num_epochs` epochs).

  A stage whose num_epochs was extended since is not finished: training
  resumes it.
  """
  results = read_json(os.path.join(stage_dir, RESULTS_FILE))
  if not results or not results.get("complete"):
    return None
  if num_epochs is not None and results["num_epochs"] < num_epochs:
    return None
  return results
