"""Host-side views of one image: crop, flip and colour noise, or centre crop.

For datasets whose images differ in size (ImageNet), the training view must
be cut out before the images can be batched, so it happens on the host.
Like the device-side augmentation, each view is a function of (seed, step,
example id) alone: a resumed run, or a run on another number of devices or
hosts, sees the same views.
"""

from __future__ import annotations

from collections.abc import Sequence
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


# PS-KD's ImageNet colour augmentation, applied to the float image in [0, 1]
# after the crop and flip: a colour jitter (each operation moves the image
# towards a target by a random fraction, in a random order) then AlexNet's
# PCA lighting noise. Nothing is clipped, as in PS-KD.
BRIGHTNESS = 0.4
CONTRAST = 0.4
SATURATION = 0.4
LIGHTING_STD = 0.1
# ImageNet's RGB eigenvalues and eigenvectors (rows), as AlexNet's.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array(
  [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
  ]
)
# The jitter's operations, by the index `jitter` takes in `order`.
JITTER_OPS = ("brightness", "contrast", "saturation")
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
# x @ _GREY3: each pixel's grey in all three channels (one BLAS call; numpy
# broadcasts over a trailing axis of 3 several times slower).
_GREY3 = np.repeat(_GREY[:, None], 3, axis=1)
# Its own stream: the crop and flip draw the same with colour on or off.
_COLOR_SALT = 0xC01


def color_rng(seed: int, step: int, example_id: int) -> np.random.Generator:
  """The random stream of one example's colour augmentation at one step."""
  return np.random.default_rng([seed, step, example_id, _COLOR_SALT])


def jitter(
  image: np.ndarray, order: Sequence[int], factors: Sequence[float]
) -> np.ndarray:
  """Colour jitter of a float32 [H, W, 3] image with the draws given.

  Args:
    image: float32 [H, W, 3], nominally in [0, 1].
    order: the indices of JITTER_OPS in the order they are applied.
    factors: each operation's fraction a, by its index in JITTER_OPS.

  Returns:
    float32 [H, W, 3]: each operation sets image + a * (target - image),
    a < 0 moving away from the target. Brightness's target is black,
    contrast's the grey image's mean, saturation's the grey image.
  """
  out = np.array(image, np.float32, order="C")
  _jitter_in_place(out, order, factors)
  return out


def lighting(image: np.ndarray, alpha: Sequence[float]) -> np.ndarray:
  """Adds EIGVEC @ (alpha * EIGVAL) to every pixel of a float [H, W, 3]."""
  out = np.array(image, np.float32, order="C")
  _light_in_place(out, alpha)
  return out


# In place, with one scratch array: at 224 x 224 x 3 a fresh temporary per
# operation costs more than the arithmetic (several times the total).
def _jitter_in_place(
  out: np.ndarray, order: Sequence[int], factors: Sequence[float]
) -> None:
  scratch = np.empty_like(out)
  for op in order:
    name = JITTER_OPS[op]
    if name == "brightness":
      np.negative(out, out=scratch)  # 0 - out
    elif name == "contrast":
      np.subtract((out @ _GREY).mean(dtype=np.float32), out, out=scratch)
    else:
      np.matmul(out, _GREY3, out=scratch)
      scratch -= out
    scratch *= np.float32(factors[op])
    out += scratch


def _light_in_place(out: np.ndarray, alpha: Sequence[float]) -> None:
  rgb = (EIGVEC @ (np.asarray(alpha, np.float64) * EIGVAL)).astype(np.float32)
  height, width = out.shape[:2]
  # One row of rgb repeated: a long broadcast axis, not a trailing 3.
  rows = np.reshape(out, (height, width * 3), copy=False)
  rows += np.tile(rgb, width)


def color_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  brightness: float = BRIGHTNESS,
  contrast: float = CONTRAST,
  saturation: float = SATURATION,
  lighting_std: float = LIGHTING_STD,
) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] / 255, jittered and lit.

  Unclipped, as in PS-KD, so values may leave [0, 1]. Each jitter
  operation draws a ~ Uniform(-strength, strength), in a fresh random
  order; lighting draws alpha ~ Normal(0, lighting_std) per eigenvector.
  The draws are made whatever the strengths, so with all of them 0 the
  result is the plain image / 255 (exactly what the device would make of
  the uint8 image).
  """
  strengths = np.array([brightness, contrast, saturation])
  order = rng.permutation(len(JITTER_OPS))
  factors = rng.uniform(-strengths, strengths)
  alpha = rng.normal(0.0, lighting_std, 3)
  out = image.astype(np.float32, order="C")
  out /= np.float32(255)
  _jitter_in_place(out, order, factors)
  _light_in_place(out, alpha)
  return out
