"""JAX's persistent compilation cache, on by default for every command.

Compiling the train step takes seconds to minutes (PreAct ResNet-18: about
15 s on a GPU, a minute on a 2-core CPU); with the compiled programs kept on
disk, a resumed or repeated run on the same machine starts at once.
"""

from __future__ import annotations

import os

from absl import logging
import jax

DEFAULT = "default"


def cache_dir(setting: str) -> str | None:
  """The folder `config.compilation_cache_dir` names; None for off ("").

  "default" is $XDG_CACHE_HOME/aikd_jax/jax (~/.cache/aikd_jax/jax).
  """
  if not setting:
    return None
  if setting == DEFAULT:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "aikd_jax", "jax")
  return os.path.expanduser(setting)


def enable(setting: str) -> str | None:
  """Points JAX's persistent cache at `setting`'s folder; returns the folder.

  A cache JAX already has (JAX_COMPILATION_CACHE_DIR) is kept. A folder that
  cannot be created only costs the cache, with a warning: the run goes on.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = cache_dir(setting)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    logging.warning(
      "Compilation cache off: cannot create %s (%s).", path, error
    )
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
