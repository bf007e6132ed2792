"""Host-side views of one image: random-resized crop and flip, or centre crop.

For datasets whose images differ in size (ImageNet), the training view must
be cut out before the images can be batched, so it happens on the host.
Like the device-side augmentation, each view is a function of (seed, step,
example id) alone: a resumed run, or a run on another number of devices or
hosts, sees the same views.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Inception-style crop: a random 8%-100% of the area, aspect ratio in
# [3/4, 4/3] (log-uniform), as torchvision's RandomResizedCrop defaults.
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10
# The evaluation view: resize the short side to size / 0.875, crop the
# centre (224 from 256, the usual ImageNet evaluation).
EVAL_CROP_FRACTION = 0.875
_SALT = 0x4A5


def view_rng(seed: int, step: int, example_id: int) -> np.random.Generator:
  """The random stream of one example's view at one step."""
  return np.random.default_rng([seed, step, example_id, _SALT])


def crop_box(
  height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random-resized crop of a height x width image."""
  area = height * width
  log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
  for _ in range(_ATTEMPTS):
    target = area * rng.uniform(*SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # No draw fitted: the whole image, cut to the nearest allowed ratio.
  ratio = width / height
  if ratio < RATIO[0]:
    w, h = width, int(round(width / RATIO[0]))
  elif ratio > RATIO[1]:
    h, w = height, int(round(height * RATIO[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 [H, W, C] image (Pillow, antialiased)."""
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def train_view(
  image: np.ndarray, size: int, rng: np.random.Generator, flip: bool
) -> np.ndarray:
  """A random-resized crop of `image` at size x size, flipped with p=0.5."""
  top, left, h, w = crop_box(image.shape[0], image.shape[1], rng)
  out = _resize(image[top : top + h, left : left + w], size, size)
  if flip and rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def eval_view(image: np.ndarray, size: int) -> np.ndarray:
  """The short side resized to size / 0.875, then the centre size x size."""
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  short = int(round(size / EVAL_CROP_FRACTION))
  scale = short / min(height, width)
  new_h = max(size, int(round(height * scale)))
  new_w = max(size, int(round(width * scale)))
  resized = _resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(resized[top : top + size, left : left + size])
