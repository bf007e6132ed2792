"""Tests for aikd_jax.models: architecture, dtypes, BatchNorm conventions."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from aikd_jax import models

# Compiled with most XLA optimisations off (conftest.py): like with like.
pytestmark = pytest.mark.usefixtures("fast_compilation")


def _param_count(tree) -> int:
  return sum(
    int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)
  )


def _expected_preact_resnet18_params(
  num_classes: int, in_channels: int = 3
) -> int:
  """PS-KD's CIFAR PreAct ResNet-18 parameter count, by hand."""
  bn = lambda c: 2 * c  # scale + bias (running stats are not parameters)
  conv3 = lambda cin, cout: 3 * 3 * cin * cout
  conv1 = lambda cin, cout: 1 * 1 * cin * cout

  def block(cin, cout):
    shortcut = (
      conv1(cin, cout) if cin != cout else 0
    )  # every stride-2 block changes width
    return bn(cin) + conv3(cin, cout) + bn(cout) + conv3(cout, cout) + shortcut

  stem = conv3(in_channels, 64) + bn(64)  # 1728 + 128
  stage1 = block(64, 64) + block(64, 64)  # 2 * 73984
  stage2 = block(64, 128) + block(128, 128)  # 229760 + 295424
  stage3 = block(128, 256) + block(256, 256)  # 918272 + 1180672
  stage4 = block(256, 512) + block(512, 512)  # 3671552 + 4720640
  head = 512 * num_classes + num_classes
  return stem + stage1 + stage2 + stage3 + stage4 + head


def _init_shapes(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
    lambda k, x: model.init(k, x, train=False), jax.random.key(0), x
  )


def test_hand_count_arithmetic():
  # The stage sums written out, so the helper itself is checked.
  assert _expected_preact_resnet18_params(100) == (
    1728
    + 128
    + 2 * 73984
    + 229760
    + 295424
    + 918272
    + 1180672
    + 3671552
    + 4720640
    + 51300
  )


@pytest.mark.parametrize("num_classes", [100, 10])
def test_preact_resnet18_param_count(num_classes):
  model = models.PreActResNet18(num_classes)
  variables = _init_shapes(model, (2, 32, 32, 3))
  count = _param_count(variables["params"])
  assert count == _expected_preact_resnet18_params(num_classes)
  assert abs(count - 11.2e6) < 0.1e6
  if num_classes == 100:
    assert count == 11_217_444


def test_preact_resnet18_structure():
  params = _init_shapes(models.PreActResNet18(100), (2, 32, 32, 3))["params"]
  # Shortcut convs (1x1, no bias, no BN) only where the shape changes.
  with_shortcut = sorted(k for k, v in params.items() if "shortcut" in v)
  assert with_shortcut == ["stage2_block1", "stage3_block1", "stage4_block1"]
  chex.assert_shape(
    params["stage3_block1"]["shortcut"]["kernel"], (1, 1, 128, 256)
  )
  assert set(params["stage3_block1"]["shortcut"]) == {"kernel"}
  assert set(params["stem_conv"]) == {"kernel"}
  chex.assert_shape(params["stem_conv"]["kernel"], (3, 3, 3, 64))
  chex.assert_shape(params["head"]["kernel"], (512, 100))
  chex.assert_shape(params["head"]["bias"], (100,))
  # One-channel inputs: only the stem changes.
  params_gray = _init_shapes(models.PreActResNet18(100), (2, 32, 32, 1))[
    "params"
  ]
  chex.assert_shape(params_gray["stem_conv"]["kernel"], (3, 3, 1, 64))
  assert _param_count(params_gray) == _expected_preact_resnet18_params(
    100, in_channels=1
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_preact_resnet18_output_and_param_dtypes(dtype):
  model = models.PreActResNet18(100, dtype=dtype)
  variables = _init_shapes(model, (4, 32, 32, 3))
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32
  x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  logits, updates = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
    variables,
    x,
  )
  chex.assert_shape(logits, (4, 100))
  assert logits.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(updates):
    assert leaf.dtype == jnp.float32
  eval_logits = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), variables, x
  )
  chex.assert_shape(eval_logits, (4, 100))
  assert eval_logits.dtype == jnp.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_cnn_forward(dtype):
  model = models.create_model("tiny_cnn", 7, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32
  logits, updates = model.apply(
    variables, x, train=True, mutable=["batch_stats"]
  )
  chex.assert_shape(logits, (3, 7))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.0)
  eval_logits = model.apply(variables, x, train=False)
  chex.assert_shape(eval_logits, (3, 7))
  assert eval_logits.dtype == jnp.float32
  if dtype == "float32":
    reference = logits
  else:
    reference = models.create_model("tiny_cnn", 7).apply(
      variables, x, train=True, mutable=["batch_stats"]
    )[0]
  chex.assert_trees_all_close(logits, reference, atol=0.1)


def test_block_shortcut_is_preactivation_not_input():
  features = 4
  block = models.PreActBlock(features, stride=1)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, features))
  variables = block.init(jax.random.key(1), x, train=False)
  assert "shortcut" not in variables["params"]
  # Non-trivial BN parameters and running statistics.
  keys = iter(jax.random.split(jax.random.key(2), 8))
  rand = lambda shape, lo, hi: jax.random.uniform(
    next(keys), shape, minval=lo, maxval=hi
  )
  params = dict(variables["params"])
  stats = dict(variables["batch_stats"])
  for bn in ("bn1", "bn2"):
    params[bn] = {
      "scale": rand((features,), 0.5, 1.5),
      "bias": rand((features,), -0.5, 0.5),
    }
    stats[bn] = {
      "mean": rand((features,), -0.5, 0.5),
      "var": rand((features,), 0.5, 2.0),
    }
  variables = {"params": params, "batch_stats": stats}
  out = block.apply(variables, x, train=False)

  def bn(name, h):
    inv = params[name]["scale"] / jnp.sqrt(stats[name]["var"] + 1e-5)
    return (h - stats[name]["mean"]) * inv + params[name]["bias"]

  def conv(name, h):
    return jax.lax.conv_general_dilated(
      h,
      params[name]["kernel"],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )

  pre = jax.nn.relu(bn("bn1", x))
  conv_path = conv("conv2", jax.nn.relu(bn("bn2", conv("conv1", pre))))
  chex.assert_trees_all_close(out, conv_path + pre, atol=1e-4)
  assert np.abs(np.asarray(out - (conv_path + x))).max() > 0.1


def test_block_downsampling_shortcut_shape():
  block = models.PreActBlock(8, stride=2)
  x = jnp.ones((2, 6, 6, 4))
  variables = block.init(jax.random.key(0), x, train=False)
  chex.assert_shape(variables["params"]["shortcut"]["kernel"], (1, 1, 4, 8))
  chex.assert_shape(block.apply(variables, x, train=False), (2, 3, 3, 8))


def test_batch_norm_momentum_and_epsilon():
  bn = models._batch_norm(train=True, dtype=jnp.float32, axis_name=None)
  assert bn.momentum == 0.9
  assert bn.epsilon == 1e-5
  assert bn.param_dtype == jnp.float32
  assert bn.use_running_average is False
  assert models._batch_norm(
    train=False, dtype=jnp.float32, axis_name=None
  ).use_running_average


def test_batch_norm_running_stats_update():
  model = models.TinyCNN(3)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  old = variables["batch_stats"]["bn1"]
  chex.assert_trees_all_close(old["mean"], jnp.zeros(16))
  chex.assert_trees_all_close(old["var"], jnp.ones(16))
  for step in range(2):  # the second step starts from non-trivial running stats
    _, state = model.apply(
      variables,
      x * (step + 1.0),
      train=True,
      capture_intermediates=True,
      mutable=["batch_stats", "intermediates"],
    )
    conv1_out = state["intermediates"]["conv1"]["__call__"][0]
    batch_mean = conv1_out.mean(axis=(0, 1, 2))
    batch_var = conv1_out.var(axis=(0, 1, 2))
    new = state["batch_stats"]["bn1"]
    chex.assert_trees_all_close(
      new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean, atol=1e-5
    )
    chex.assert_trees_all_close(
      new["var"], 0.9 * old["var"] + 0.1 * batch_var, atol=1e-5
    )
    variables = {
      "params": variables["params"],
      "batch_stats": state["batch_stats"],
    }
    old = new


def test_bn_axis_name_under_shard_map():
  # Runs on however many devices exist (1 on a plain CPU run): synchronised BN
  # over a 'data' mesh must equal per-device BN on the whole batch at once.
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  x = jax.random.normal(jax.random.key(0), (4 * n, 8, 8, 3))
  plain = models.create_model("tiny_cnn", 5)
  synced = models.create_model("tiny_cnn", 5, bn_axis_name="data")
  variables = plain.init(jax.random.key(1), x, train=False)
  expected = plain.apply(variables, x, train=True, mutable=["batch_stats"])

  @jax.jit
  def sharded_forward(variables, x):
    return jax.shard_map(
      lambda v, x: synced.apply(v, x, train=True, mutable=["batch_stats"]),
      mesh=mesh,
      in_specs=(P(), P("data")),
      out_specs=(P("data"), P()),
    )(variables, x)

  # Place the inputs as the specs say (make_mesh may give Explicit axes).
  shard = lambda tree, spec: jax.device_put(
    tree, jax.sharding.NamedSharding(mesh, spec)
  )
  actual = sharded_forward(shard(variables, P()), shard(x, P("data")))
  chex.assert_trees_all_close(actual, expected, atol=1e-5)


def test_discriminator_shapes():
  disc = models.Discriminator()
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (5, 10)))
  variables = disc.init(jax.random.key(1), probs)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables["params"])
  assert shapes == {
    "hidden1": {"kernel": (10, 256), "bias": (256,)},
    "hidden2": {"kernel": (256, 256), "bias": (256,)},
    "out": {"kernel": (256, 1), "bias": (1,)},
  }
  logits = disc.apply(variables, probs)
  chex.assert_shape(logits, (5,))
  assert logits.dtype == jnp.float32
  bf16_logits = models.Discriminator(dtype=jnp.bfloat16).apply(variables, probs)
  assert bf16_logits.dtype == jnp.float32
  chex.assert_trees_all_close(bf16_logits, logits, atol=0.05)


def test_torch_style_initialisers():
  params = models.Discriminator().init(jax.random.key(0), jnp.zeros((1, 10)))[
    "params"
  ]
  bound = 1.0 / np.sqrt(256)
  kernel = np.asarray(params["hidden2"]["kernel"])
  bias = np.asarray(params["hidden2"]["bias"])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)


def test_create_model():
  assert models.MODEL_NAMES == (
    "preact_resnet18",
    "densenet121",
    "resnext29",
    "pyramidnet200",
    "pyramidnet200_shakedrop",
    "resnet152",
    "tiny_cnn",
  )
  model = models.create_model(
    "preact_resnet18", 10, dtype="bfloat16", bn_axis_name="data"
  )
  assert isinstance(model, models.PreActResNet18)
  assert model.dtype == jnp.bfloat16 and model.bn_axis_name == "data"
  assert isinstance(models.create_model("tiny_cnn", 10), models.TinyCNN)
  with pytest.raises(ValueError, match="preact_resnet18, densenet121, "):
    models.create_model("resnet50", 10)


def test_compute_dtype():
  assert models.compute_dtype("float32") == jnp.float32
  assert models.compute_dtype("bfloat16") == jnp.bfloat16
  assert models.compute_dtype(jnp.bfloat16) == jnp.bfloat16
  with pytest.raises(ValueError, match="bfloat16"):
    models.compute_dtype("float16")
