"""The host's colour augmentation (PS-KD's ImageNet jitter and lighting).

Its formulas on hand-made images with the draws given, its keying, its
statistics, and that it leaves the crop and flip as they were: with the
option off the streamed batches are today's uint8 crops, and with every
strength at 0 they are the same crops, scaled to [0, 1].
"""

from __future__ import annotations

import functools

from e2e_util import digits_config
from e2e_util import edit_saved_config
import jax
import numpy as np
import pytest

from aikd_jax import augment
from aikd_jax import banks
from aikd_jax import data as data_lib
from aikd_jax import host_augment
from aikd_jax import input_pipeline
from aikd_jax import run_config
from aikd_jax import streaming

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
# Two pixels, shape [1, 2, 3]; grey 0.299 R + 0.587 G + 0.114 B of each is
# 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6 = 0.3630 and
# 0.299 * 1.0 + 0.587 * 0.5 + 0.114 * 0.0 = 0.5925; their mean 0.47775.
PIXELS = np.array([[[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]]], np.float32)
GREY = np.array([0.3630, 0.5925])


def _jitter(op, a, image=PIXELS):
  factors = [0.0, 0.0, 0.0]
  factors[op] = a
  return host_augment.jitter(image, [op], factors)


def test_jitter_operations_match_hand_computed_values():
  np.testing.assert_allclose(_jitter(BRIGHTNESS, 0.5), PIXELS / 2, rtol=1e-6)
  np.testing.assert_allclose(_jitter(BRIGHTNESS, -0.4), PIXELS * 1.4, rtol=1e-6)
  grey = np.repeat(GREY[None, :, None], 3, axis=2)
  np.testing.assert_allclose(_jitter(SATURATION, 1.0), grey, atol=1e-6)
  # a = -0.5 moves away from grey: 1.5 * pixel - 0.5 * its grey.
  np.testing.assert_allclose(
    _jitter(SATURATION, -0.5)[0, 0],
    [0.3 - 0.1815, 0.6 - 0.1815, 0.9 - 0.1815],
    atol=1e-6,
  )
  np.testing.assert_allclose(
    _jitter(CONTRAST, 1.0), np.full((1, 2, 3), 0.47775), atol=1e-6
  )
  # Half way to the mean grey.
  np.testing.assert_allclose(
    _jitter(CONTRAST, 0.5)[0, 1],
    [(1.0 + 0.47775) / 2, (0.5 + 0.47775) / 2, 0.47775 / 2],
    atol=1e-6,
  )
  for op in (BRIGHTNESS, CONTRAST, SATURATION):
    np.testing.assert_array_equal(_jitter(op, 0.0), PIXELS)
  assert _jitter(CONTRAST, 0.5).dtype == np.float32


def test_jitter_applies_its_operations_in_the_order_given():
  factors = [0.5, -0.3, 0.8]
  for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
    expected = PIXELS
    for op in order:
      expected = _jitter(op, factors[op], expected)
    out = host_augment.jitter(PIXELS, order, factors)
    np.testing.assert_array_equal(out, expected)
  # Saturation to grey then contrast to its mean: a constant image; the
  # other way round, the constant's saturation is itself.
  a = [0.0, 1.0, 1.0]
  constant = host_augment.jitter(PIXELS, [SATURATION, CONTRAST], a)
  np.testing.assert_allclose(constant, np.full((1, 2, 3), 0.47775), atol=1e-6)
  grey = host_augment.jitter(PIXELS, [CONTRAST, SATURATION], a)
  np.testing.assert_allclose(grey, np.full((1, 2, 3), 0.47775), atol=1e-6)


def test_lighting_adds_the_eigenvector_combination():
  # alpha (1, 0, 0): 0.2175 times the first column of the eigenvectors.
  np.testing.assert_allclose(
    host_augment.lighting(PIXELS, [1.0, 0.0, 0.0]) - PIXELS,
    np.broadcast_to([-0.12343125, -0.126324, -0.126933], (1, 2, 3)),
    atol=1e-6,
  )
  # alpha (0, 2, -1): 2 * 0.0188 * second column - 0.0045 * third.
  second = 2 * 0.0188 * np.array([0.7192, -0.0045, -0.6948])
  third = -0.0045 * np.array([0.4009, -0.8140, 0.4203])
  np.testing.assert_allclose(
    host_augment.lighting(PIXELS, [0.0, 2.0, -1.0])[0, 1],
    PIXELS[0, 1] + second + third,
    atol=1e-6,
  )


def _image(seed=0, shape=(24, 32, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def test_colour_views_are_keyed_by_seed_step_and_id():
  image = _image()
  view = lambda *key: host_augment.color_augment(
    image, host_augment.color_rng(*key)
  )
  assert view(0, 5, 7).dtype == np.float32
  np.testing.assert_array_equal(view(0, 5, 7), view(0, 5, 7))
  for other in ((1, 5, 7), (0, 6, 7), (0, 5, 8)):
    assert not np.array_equal(view(*other), view(0, 5, 7))
  # Unclipped: a bright image brightened leaves [0, 1].
  white = np.full((4, 4, 3), 255, np.uint8)
  peaks = [
    host_augment.color_augment(white, host_augment.color_rng(0, 0, i)).max()
    for i in range(20)
  ]
  assert max(peaks) > 1.05


def test_zero_strengths_give_the_image_over_255():
  image = _image()
  out = host_augment.color_augment(
    image,
    host_augment.color_rng(0, 3, 4),
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    lighting_std=0.0,
  )
  np.testing.assert_array_equal(out, image.astype(np.float32) / 255)


def _grey_pixels(seed: int, n: int, **strengths) -> np.ndarray:
  """The top-left pixel of a mid-grey image, colour-augmented as examples
  0..n-1 at step 0: [n, 3]."""
  grey = np.full((2, 2, 3), 128, np.uint8)
  return np.stack(
    [
      host_augment.color_augment(
        grey, host_augment.color_rng(seed, 0, i), **strengths
      )[0, 0]
      for i in range(n)
    ]
  )


def test_lighting_shift_averages_zero_and_brightness_stays_in_range():
  n = 4000
  no_jitter = dict(brightness=0.0, contrast=0.0, saturation=0.0)
  lit = _grey_pixels(0, n, **no_jitter) - 128 / 255
  # The first eigenvector's shift has std 0.1 * 0.2175 * 0.58 ~ 0.013.
  np.testing.assert_allclose(lit.mean(0), 0.0, atol=4 * 0.013 / np.sqrt(n))
  assert 0.008 < lit.std(0).min() and lit.std(0).max() < 0.02
  brightness_only = dict(contrast=0.0, saturation=0.0, lighting_std=0.0)
  factors = _grey_pixels(1, n, **brightness_only)[:, 0] / (128 / 255)
  assert 0.6 <= factors.min() < 0.62 and 1.38 < factors.max() <= 1.4
  assert abs(factors.mean() - 1.0) < 0.01


def _rgb_dataset():
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 20, 28, 3), np.uint8)
  labels = lambda n: (np.arange(n) % 3).astype(np.int32)
  return data_lib.Dataset(
    "rgb", images(24), labels(24), images(8), labels(8), 3
  )


def _first_batch_images(config, dataset, mesh):
  data = input_pipeline.stream_arrays(dataset, mesh, config)
  batches = streaming.train_batches(
    data,
    mesh,
    seed=config.seed,
    epoch=1,
    first_step=0,
    steps_per_epoch=2,
    per_device_batch=8,
    image_size=config.image_size,
    flip=True,
  )
  return next(batches).images, data


@pytest.mark.parametrize("zero_strengths", [False, True])
def test_colour_leaves_the_crops_and_flips_as_they_were(
  zero_strengths, monkeypatch
):
  dataset, mesh = _rgb_dataset(), banks.data_mesh(jax.devices()[:1])
  config = digits_config(
    host_augment=True, image_size=12, mean=(0.5,) * 3, std=(0.25,) * 3
  )
  off, data = _first_batch_images(config, dataset, mesh)
  off = np.asarray(off)
  # Off: today's crops, computed here from their keys.
  assert off.dtype == np.uint8
  order = banks.epoch_order(data.layout, config.seed, 1)[:8]
  for row, image in zip(order, off):
    index = data.index_of_id[row]
    rng = host_augment.view_rng(config.seed, 2, int(row))
    expected = host_augment.train_view(
      dataset.train_images[index], 12, rng, flip=True
    )
    np.testing.assert_array_equal(image, expected)
  if zero_strengths:
    monkeypatch.setattr(
      host_augment,
      "color_augment",
      functools.partial(
        host_augment.color_augment,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        lighting_std=0.0,
      ),
    )
  config.host_color_augment = True
  on, _ = _first_batch_images(config, dataset, mesh)
  assert on.dtype == np.float32
  scaled = off.astype(np.float32) / 255
  if zero_strengths:
    # The same crops, and the step normalises them to the same bits.
    np.testing.assert_array_equal(np.asarray(on), scaled)
    normalize = lambda x: np.asarray(augment.normalize(x, config.mean, 0.25))
    np.testing.assert_array_equal(normalize(on), normalize(off))
  else:
    assert np.abs(np.asarray(on) - scaled).mean() > 0.01


def test_a_run_cannot_switch_its_colour_augmentation(tmp_path):
  stream = dict(host_augment=True, image_size=8, input_pipeline="stream")
  workdir = str(tmp_path)
  run_config.save(digits_config(**stream), workdir)
  on = digits_config(host_color_augment=True, **stream)
  with pytest.raises(run_config.ConfigError, match="host_color_augment"):
    run_config.compare_with_saved(on, workdir)
  # A workdir that predates the option ran without it and resumes so.
  edit_saved_config(workdir, lambda saved: saved.pop("host_color_augment"))
  assert run_config.compare_with_saved(digits_config(**stream), workdir) == []
  with pytest.raises(run_config.ConfigError, match="host_color_augment"):
    run_config.compare_with_saved(on, workdir)
