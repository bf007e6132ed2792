"""Checks a config before any compute, and the workdir's memory of it.

A workdir keeps the config it was started with (config.json, written once
and never rewritten) and, in config_changes.json, each later change a rerun
was allowed to make (with its time). A rerun may change only fields that
cannot change the result (or extend num_epochs); anything else is refused
with the list of differing fields, so a resumed run is always the run that
was asked for. A refused rerun records nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import tempfile
from typing import Any

import jax
import ml_collections

from aikd_jax import data as data_lib
from aikd_jax import models
from aikd_jax import results as results_lib
from aikd_jax.objective import OVERRIDABLE_FIELDS
from aikd_jax.objective import Objective
from aikd_jax.objective import resolve_objective

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.json"
# Fields that never change what is trained or how it is evaluated.
RESULT_NEUTRAL_FIELDS = frozenset(
  {
    "log_every_steps",
    "compilation_cache_dir",
    "eval_batch_size",
    "checkpoint_every_epochs",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "data_dir",
    "download",
    # Streamed batches equal the device-resident ones (host_augment aside).
    "input_pipeline",
    "device_data_budget_gb",
    "stream_workers",
    "stream_prefetch",
  }
)
# Fields that may grow between runs (checked against the progress made).
EXTENDABLE_FIELDS = frozenset({"num_epochs", "teacher_num_epochs"})
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config that cannot run, or that conflicts with the workdir's."""


def objective_from_config(
  config: ml_collections.ConfigDict | dict,
) -> Objective:
  """The method's preset with the config's overrides (or a saved dict's)."""
  overrides = {name: config.get(name) for name in OVERRIDABLE_FIELDS}
  return resolve_objective(config.get("method"), overrides)


def teacher_epochs(config: ml_collections.ConfigDict) -> int:
  return config.teacher_num_epochs or config.num_epochs


def validate(config: ml_collections.ConfigDict) -> Objective:
  """Raises ConfigError naming the first bad field; returns the objective."""
  try:
    objective = objective_from_config(config)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if config.model not in models.MODEL_NAMES:
    raise ConfigError(
      f"Unknown model {config.model!r}; choose one of "
      f"{', '.join(models.MODEL_NAMES)}."
    )
  if not (
    config.dataset in data_lib.KNOWN_DATASETS
    or str(config.dataset).startswith(data_lib.FOLDER_PREFIX)
    or str(config.dataset).startswith(data_lib.TFDS_PREFIX)
  ):
    raise ConfigError(
      f"Unknown dataset {config.dataset!r}; choose one of "
      f"{', '.join(data_lib.KNOWN_DATASETS)}, "
      f"{data_lib.FOLDER_PREFIX}/path/to/images or "
      f"{data_lib.TFDS_PREFIX}NAME."
    )
  _validate_input_pipeline(config, objective)
  for field in ("compute_dtype", "bank_dtype"):
    if config[field] not in DTYPES:
      raise ConfigError(
        f"{field} must be one of {DTYPES}, got {config[field]!r}."
      )
  positive = (
    "num_epochs",
    "batch_size",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_every_epochs",
    "keep_checkpoints",
  )
  for field in positive:
    if not config[field] > 0:
      raise ConfigError(f"{field} must be positive, got {config[field]}.")
  if config.teacher_num_epochs is not None and config.teacher_num_epochs <= 0:
    raise ConfigError(
      f"teacher_num_epochs must be positive, got {config.teacher_num_epochs}."
    )
  for field in ("learning_rate", "disc_learning_rate"):
    if not config[field] > 0:
      raise ConfigError(f"{field} must be positive, got {config[field]}.")
  for field in (
    "weight_decay",
    "crop_padding",
    "warmup_epochs",
    "checkpoint_every_minutes",
    "steps_per_dispatch",  # 0: automatic (dispatch.py).
  ):
    if config[field] < 0:
      raise ConfigError(f"{field} must be non-negative, got {config[field]}.")
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ConfigError(
        f"{field}={config[field]} is not divisible by the {devices} "
        f"devices; use a multiple of {devices}."
      )
  if len(config.mean) != len(config.std):
    raise ConfigError(
      "mean and std must have the same length (or both be "
      "empty to use the train split's statistics)."
    )
  if any(s <= 0 for s in config.std):
    raise ConfigError(f"std must be positive, got {tuple(config.std)}.")
  if config.teacher_checkpoint and not os.path.isdir(config.teacher_checkpoint):
    raise ConfigError(
      f"teacher_checkpoint {config.teacher_checkpoint!r} is not a directory."
    )
  return objective


INPUT_PIPELINES = ("auto", "device", "stream")


def _validate_input_pipeline(
  config: ml_collections.ConfigDict, objective: Objective
) -> None:
  """The streaming fields: known values, and combinations that can run."""
  if config.input_pipeline not in INPUT_PIPELINES:
    raise ConfigError(
      f"input_pipeline must be one of {INPUT_PIPELINES}, got "
      f"{config.input_pipeline!r}."
    )
  if not config.device_data_budget_gb > 0:
    raise ConfigError(
      "device_data_budget_gb must be positive, got "
      f"{config.device_data_budget_gb}."
    )
  for field in ("stream_workers", "stream_prefetch"):
    if not config[field] > 0:
      raise ConfigError(f"{field} must be positive, got {config[field]}.")
  if config.host_augment and config.input_pipeline == "device":
    raise ConfigError(
      "host_augment crops on the host, so it needs "
      "input_pipeline='stream' (or 'auto'), not 'device'."
    )
  if config.host_augment and not config.image_size > 0:
    raise ConfigError(
      "host_augment crops to image_size; set --config.image_size (e.g. 224)."
    )
  if config.host_color_augment and not config.host_augment:
    raise ConfigError(
      "host_color_augment jitters the host's crops, so it needs "
      "host_augment=True."
    )
  if objective.uses_partners and config.input_pipeline == "stream":
    raise ConfigError(
      f"method {config.method!r} reads same-class partner images, which "
      "streamed batches do not carry; use input_pipeline='device'."
    )


def check_workdir(workdir: str) -> None:
  """Raises ConfigError if `workdir` cannot hold a run.

  Tries it for real (a temporary folder, removed at once) rather than trusting
  permission bits, which say yes to root even where nothing can be created.
  """
  if not workdir:
    raise ConfigError("--workdir is empty; name a directory for the run.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file, not a directory.")
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(
      f"--workdir {workdir!r} is not writable: it lies under "
      f"{probe!r}, which is a file, not a directory."
    )
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".aikd-write-test-", dir=probe))
  except OSError as error:
    raise ConfigError(
      f"--workdir {workdir!r} is not writable: nothing can "
      f"be created in {probe!r} ({error.strerror})."
    ) from None


# Not a config field, but the example-to-device layout (and so the result)
# depends on it; the workdir remembers it with the config.
DEVICES_FIELD = "num_devices"


# Not a config field either: what the method's preset and the config's
# overrides resolved to when the run started. A preset whose default changes
# later (a new stabiliser) then cannot change a resumed run.
OBJECTIVE_FIELD = "objective"
# The presets' values, where they differ from today's, for the workdirs whose
# config.json predates OBJECTIVE_FIELD: CS-KD had no gradient clip.
PRESETS_BEFORE_THE_RECORD = {"cs_kd": {"grad_clip_norm": 0.0}}


def _resolved(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  return dataclasses.asdict(objective_from_config(config))


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  # JSON round trip: tuples become lists on both sides of the comparison.
  return {
    **json.loads(config.to_json()),
    DEVICES_FIELD: jax.device_count(),
    OBJECTIVE_FIELD: _resolved(config),
  }


def _recorded_objective(saved: dict[str, Any]) -> dict[str, Any] | None:
  """The objective a saved config's run started with (None: not valid)."""
  if OBJECTIVE_FIELD in saved:
    return saved[OBJECTIVE_FIELD]
  try:
    resolved = _resolved(saved)
  except ValueError:
    return None
  for name, value in PRESETS_BEFORE_THE_RECORD.get(saved["method"], {}).items():
    if saved.get(name) is None:
      resolved[name] = value
  return resolved


def _same_objective(saved: dict[str, Any], current: dict[str, Any]) -> bool:
  """Whether the current config resolves to the objective the run started
  with."""
  return saved[OBJECTIVE_FIELD] == current[OBJECTIVE_FIELD]


# Fields added (or whose default changed) after workdirs already existed:
# the value that reproduces what a run started before did, and the field's
# default now. See `adopt_legacy_values`.
LEGACY_VALUES = {
  # Before the ramp, the pre-trained model's terms had full weight at once.
  "teacher_ramp_epochs": (0.0, None),
  "warmup_epochs": (0.0, 0.0),  # No warmup.
  # No clipping; its default was 0.0 before the presets chose theirs.
  "grad_clip_norm": (0.0, None),
  "steps_per_dispatch": (1, 0),  # One step per call; now automatic.
  "checkpoint_every_minutes": (0.0, 0.0),  # By epochs.
  # Before streaming, every split lived on the devices.
  "input_pipeline": ("auto", "auto"),
  "device_data_budget_gb": (4.0, 4.0),
  "host_augment": (False, False),
  "host_color_augment": (False, False),
  "stream_workers": (8, 8),
  "stream_prefetch": (2, 2),
}


def _same_program_kind(field: str, old: Any, new: Any) -> bool:
  """Whether a change of `field` keeps the result bit for bit.

  Every steps_per_dispatch above 1 runs the same compiled loop body, so
  they give the same run; 1 runs the plain step, equal to them only to
  float rounding. The automatic value counts as what it chooses on this
  machine for a training split on the devices (a streamed one refuses
  K > 1 anyway).
  """
  if field != "steps_per_dispatch":
    return False
  from aikd_jax import dispatch  # pylint: disable=g-import-not-at-top

  kinds = [
    min(dispatch.steps_per_call(k, False, jax.default_backend()), 2)
    for k in (old, new)
  ]
  return kinds[0] == kinds[1]


def _started_config(workdir: str) -> dict[str, Any] | None:
  return results_lib.read_json(os.path.join(workdir, CONFIG_FILE))


def _changes(workdir: str) -> list[dict[str, Any]]:
  return results_lib.read_json(os.path.join(workdir, CHANGES_FILE)) or []


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's config as last accepted: config.json, the recorded
  changes applied in order, fields it predates at their legacy values."""
  saved = _started_config(workdir)
  if saved is None:
    return None
  for change in _changes(workdir):
    for field, (_, new) in change["fields"].items():
      saved[field] = new
  for field, (legacy, _) in LEGACY_VALUES.items():
    saved.setdefault(field, legacy)
  saved[OBJECTIVE_FIELD] = _recorded_objective(saved)
  return saved


def adopt_legacy_values(
  config: ml_collections.ConfigDict, workdir: str
) -> list[str]:
  """Resumes a workdir that predates a field the way it was started.

  A field added since the workdir's config.json was written (LEGACY_VALUES)
  had no say in the run so far; its default now may change the training
  (teacher_ramp_epochs' default ramps the pre-trained model's terms in,
  which a run started before it never did). Refusing would make every such
  workdir unresumable without a flag the user cannot guess, while the old
  behaviour is known exactly, so a field still at its default takes its
  legacy value instead; a field set explicitly to something else is left
  alone and refused by `compare_with_saved` like any other change. The same
  holds for a field saved at its former default (grad_clip_norm's 0.0,
  before the presets had a clip of their own).

  Returns:
    One line per adopted field, for the log.
  """
  saved = saved_config(workdir)
  if saved is None:
    return []
  started = _started_config(workdir)
  lines = []
  for field, (legacy, default) in LEGACY_VALUES.items():
    if config[field] != default or default == legacy:
      continue
    if field not in started:
      why = f"{CONFIG_FILE} predates {field}"
    elif saved[field] == legacy:
      # Saved as the old default: spelled out then, meant the same.
      why = f"the workdir was started with {field}={legacy!r}"
    else:
      continue
    config[field] = legacy
    lines.append(
      f"{why}: resuming with {field}={legacy!r}, as the run was started."
    )
  return lines + _adopt_recorded_objective(config, saved)


def _adopt_recorded_objective(
  config: ml_collections.ConfigDict, saved: dict[str, Any]
) -> list[str]:
  """A preset's value changed since the run started: the run keeps the old
  one, unless the config sets that field itself."""
  recorded = saved[OBJECTIVE_FIELD]
  if recorded is None or config.method != saved["method"]:
    return []
  now = _resolved(config)
  lines = []
  for name in OVERRIDABLE_FIELDS:
    if config[name] is None and recorded[name] != now[name]:
      config[name] = recorded[name]
      lines.append(
        f"{config.method}'s {name} was {recorded[name]!r} when the workdir "
        f"was started ({now[name]!r} now): resuming with "
        f"{name}={recorded[name]!r}."
      )
  return lines


# What a teacher-only workdir's result does not depend on.
STUDENT_ONLY_FIELDS = frozenset(
  ("method", "num_epochs", "teacher_checkpoint", OBJECTIVE_FIELD)
  + OVERRIDABLE_FIELDS
)


def compare_with_saved(
  config: ml_collections.ConfigDict,
  workdir: str,
  ignore: frozenset = frozenset(),
) -> list[str]:
  """Returns notes on accepted changes; raises ConfigError on unsafe ones.

  Fields in `ignore` may differ freely (a shared teacher's workdir ignores
  the student's method).
  """
  saved = saved_config(workdir)
  if saved is None:
    return []
  config = copy.deepcopy(config)
  adopt_legacy_values(config, workdir)
  current = _plain(config)
  # Spelling a preset's own value out (e.g. lambda_adv=0.1 for ai_kd)
  # changes nothing.
  same_objective = _same_objective(saved, current)
  unsafe, notes = [], []
  for field in sorted((set(saved) | set(current)) - {OBJECTIVE_FIELD}):
    old, new = saved.get(field), current.get(field)
    if old == new or field in ignore:
      continue
    line = f"  {field}: {old!r} (saved) -> {new!r} (now)"
    if (
      field in RESULT_NEUTRAL_FIELDS
      or field in EXTENDABLE_FIELDS
      or _same_program_kind(field, old, new)
      or (same_objective and field in ("method",) + OVERRIDABLE_FIELDS)
    ):
      notes.append(line)
    else:
      unsafe.append(line)
  if not same_objective and OBJECTIVE_FIELD not in ignore:
    recorded = saved[OBJECTIVE_FIELD] or {}
    unsafe += [
      f"  {name}, as the method resolves it: {recorded.get(name)!r} (saved) "
      f"-> {value!r} (now)"
      for name, value in current[OBJECTIVE_FIELD].items()
      if recorded.get(name) != value
    ]
  if unsafe:
    raise ConfigError(
      f"The workdir {workdir!r} holds a run with a different config; these "
      "fields would change its result:\n"
      + "\n".join(unsafe)
      + "\nRerun with the saved values, or use a new --workdir."
    )
  return notes


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records an accepted config: config.json if the workdir has none, else
  the fields that differ from the saved config as one more entry of
  config_changes.json. Both written atomically; config.json never again."""
  current = _plain(config)
  saved = saved_config(workdir)
  if saved is None:
    results_lib.write_json(
      os.path.join(workdir, CONFIG_FILE), current, sort_keys=True
    )
    return
  fields = {
    field: [saved.get(field), current.get(field)]
    for field in sorted(set(saved) | set(current))
    if saved.get(field) != current.get(field)
  }
  if fields:
    record_changes(workdir, fields)


def record_changes(workdir: str, fields: dict[str, list[Any]]) -> None:
  """Appends one entry, {field: [old, new]}, to config_changes.json."""
  changes = _changes(workdir) + [
    {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
      ),
      "fields": fields,
    }
  ]
  results_lib.write_json(os.path.join(workdir, CHANGES_FILE), changes)
