"""The benchmarks' FLOP count: convolutions and matrix products of a
lowered program, by hand-countable cases."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _conv(x, w, stride):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _flops(fn, *args) -> float:
  return common.matrix_flops(jax.jit(fn).lower(*args).as_text())


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_and_both_gradients(stride):
  x = jnp.ones((4, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 16))
  out_pixels = (8 // stride) ** 2
  forward = 2 * 4 * out_pixels * 16 * (3 * 3 * 3)
  assert _flops(lambda x, w: _conv(x, w, stride), x, w) == forward
  # The weight gradient and the input gradient each cost a forward pass,
  # the strided one too (its zero-dilated input is not counted).
  step = jax.value_and_grad(
    lambda x, w: jnp.sum(_conv(x, w, stride) ** 2), argnums=(0, 1)
  )
  assert _flops(step, x, w) == 3 * forward


def test_dot_general_and_called_functions_count_per_call():
  a, b = jnp.ones((5, 7)), jnp.ones((7, 3))
  matmul = jax.jit(lambda a, b: a @ b)  # A function of its own, called twice.
  assert _flops(lambda a, b: matmul(a, b) + matmul(a, b), a, b) == (
    2 * 2 * 5 * 3 * 7
  )
  batched = jnp.ones((2, 5, 7)), jnp.ones((2, 7, 3))
  assert _flops(jnp.matmul, *batched) == 2 * 2 * 5 * 3 * 7
