"""PyTorch parity of the training dynamics, step by step.

  python benchmarks/torch_parity.py --steps=15 --batch_size=128 \
      --objective=ce_kd --lr=0.1 --data=folder:FASHION_MNIST_200

Builds PS-KD's PreAct ResNet-18 in PyTorch (the class in
`torch_reference.py`), copies its initial parameters and BatchNorm running
statistics into the Flax `aikd_jax.models.PreActResNet18` (built with
`models.create_model`), then trains both on the same un-augmented batches:

- torch: torch.optim.SGD(lr, momentum 0.9, nesterov, weight_decay 5e-4) with
  PS-KD's MultiStepLR milestones (epochs 150 and 225, x0.1), training-mode
  BatchNorm, float32, NCHW;
- JAX: the project's own `optim.student_optimizer` +
  `optim.student_learning_rate`, `losses.soft_cross_entropy` (one-hot targets)
  and `losses.distillation_kl`, the same model in NHWC.

Objectives: `ce` is cross-entropy; `ce_kd` is CE + weight * tau^2 *
KL(softmax(t / tau) || softmax(z / tau)) with tau 4 and weight 1, where the
teacher logits t are a FIXED CONFIDENT ARRAY, not a trained model:
t = teacher_scale * onehot(label) + teacher_noise * N(0, 1), one row per
training example, drawn once from the seed (defaults 8 and 0.5).

Each step records, in both frameworks, the loss and the global L2 norm of the
loss gradient (before weight decay), both at the parameters before the
update, the largest |logit| of the batch, and, after the update, dtheta =
||theta_jax - theta_torch|| / ||theta_torch - theta_0|| (the gap between the
two trajectories as a fraction of how far torch has moved). A framework
diverges at the first step whose loss or logits are non-finite or exceed 1e4
in magnitude; the run stops once every framework has diverged.

--control64 also trains a float64 copy of the torch model from the same start
on the same batches: how far float32 rounding alone moves a run, i.e. the
tolerance any float32 implementation can be held to at each step.

Numerics: torch runs with deterministic algorithms, JAX under
`jax.default_matmul_precision('highest')` (scoped to the run, not a global
config change). Without PyTorch installed, prints a skip message and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_HERE)
for _path in (REPO_ROOT, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch_reference  # noqa: E402

torch = torch_reference.torch  # None without PyTorch.
if torch is not None:
  import torch.nn.functional as F

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from aikd_jax import losses  # noqa: E402
from aikd_jax import models  # noqa: E402
from aikd_jax import optim  # noqa: E402

MEAN = torch_reference.MEAN
STD = torch_reference.STD
OBJECTIVES = ("ce", "ce_kd")
DIVERGENCE_THRESHOLD = 1e4
# PS-KD's recipe.
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
DECAY_EPOCHS = (150, 225)
DECAY_FACTOR = 0.1
SKIP_MESSAGE = (
  "PyTorch is not installed: skipping the torch parity check "
  "(pip install torch to run it)."
)


def available() -> bool:
  return torch is not None


# ---------------------------------------------------------------------------
# Data.


def load_images(
  data: str,
  *,
  num_examples: int = 512,
  num_classes: int = 10,
  image_size: int = 32,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
  """uint8 [N, H, W, 3] images, int64 [N] labels and the class count.

  'random': uniform noise images and labels; 'digits': scikit-learn's 8x8
  digits (grey, repeated to 3 channels); 'folder:PATH': PATH/train/<class>/*
  (or PATH/<class>/*) read with PIL as RGB, classes sorted by name.
  """
  if data == "random":
    rng = np.random.default_rng(seed)
    images = rng.integers(
      0, 256, (num_examples, image_size, image_size, 3), dtype=np.uint8
    )
    labels = rng.integers(0, num_classes, num_examples).astype(np.int64)
    return images, labels, num_classes
  if data == "digits":
    from sklearn import datasets as sk_datasets

    digits = sk_datasets.load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    return images, digits.target.astype(np.int64), 10
  if data.startswith("folder:"):
    from PIL import Image

    root = data[len("folder:") :]
    if os.path.isdir(os.path.join(root, "train")):
      root = os.path.join(root, "train")
    classes = sorted(
      d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
    )
    images, labels = [], []
    for label, name in enumerate(classes):
      folder = os.path.join(root, name)
      for filename in sorted(os.listdir(folder)):
        if filename.lower().endswith((".png", ".jpg", ".jpeg")):
          with Image.open(os.path.join(folder, filename)) as image:
            images.append(np.asarray(image.convert("RGB"), np.uint8))
          labels.append(label)
    if not images:
      raise ValueError(f"no images under {root}/<class>/")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
      raise ValueError(f"images under {root} differ in size: {sorted(shapes)}")
    return np.stack(images), np.asarray(labels, np.int64), len(classes)
  raise ValueError(f"Unknown data {data!r}; use digits, random or folder:PATH.")


def normalise(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC -> float32 NHWC, (x / 255 - mean) / std, as PS-KD does."""
  x = images.astype(np.float32) / np.float32(255.0)
  return (
    (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  ).astype(np.float32)


def teacher_logits(
  labels: np.ndarray, num_classes: int, scale: float, noise: float, seed: int
) -> np.ndarray:
  """The fixed confident teacher: scale * onehot(label) + noise * N(0, 1)."""
  rng = np.random.default_rng(seed + 1)
  onehot = np.eye(num_classes, dtype=np.float32)[labels]
  return (scale * onehot + noise * rng.standard_normal(onehot.shape)).astype(
    np.float32
  )


# ---------------------------------------------------------------------------
# Parameters: torch state_dict <-> Flax variables.


def _flax_location(torch_name: str) -> tuple[str, tuple[str, ...]]:
  """(collection, path) in the Flax variables of one torch state_dict entry.

  torch `conv1`/`bn1`/`linear` are Flax `stem_conv`/`stem_bn`/`head`;
  `layers.{i}` is `stage{i // 2 + 1}_block{i % 2 + 1}`, whose `bn1`, `conv1`,
  `bn2`, `conv2`, `shortcut` keep their names.
  """
  parts = torch_name.split(".")
  leaf = parts[-1]
  if parts[0] == "layers":  # layers.{i}.{module}.{leaf}
    index = int(parts[1])
    module = (f"stage{index // 2 + 1}_block{index % 2 + 1}", parts[2])
  else:
    module = {
      "conv1": ("stem_conv",),
      "bn1": ("stem_bn",),
      "linear": ("head",),
    }[parts[0]]
  if module[-1] == "head":
    return "params", module + ({"weight": "kernel", "bias": "bias"}[leaf],)
  if module[-1] in ("stem_conv", "conv1", "conv2", "shortcut"):
    return "params", module + ("kernel",)
  collection, name = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
  }[leaf]
  return collection, module + (name,)


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # linear [out, in] -> [in, out]
    return value.T
  return value


def torch_state(model) -> dict[str, np.ndarray]:
  """The model's parameters and running statistics, as numpy (torch layout)."""
  return {
    name: tensor.detach().cpu().numpy().copy()
    for name, tensor in model.state_dict().items()
    if not name.endswith("num_batches_tracked")
  }


def torch_to_flax(
  state: dict[str, np.ndarray], shapes: dict[str, Any]
) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} holding the torch values.

  `shapes` is the Flax model's variable tree (e.g. from jax.eval_shape): every
  Flax leaf must receive exactly one torch tensor of its shape.
  """
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for name, value in state.items():
    collection, path = _flax_location(name)
    node = out[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    if path[-1] in node:
      raise ValueError(f"two torch tensors map to {collection}/{path}")
    node[path[-1]] = jnp.asarray(_to_flax_layout(value))
  want = jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(shapes))
  got = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
  if want != got:
    raise ValueError(
      f"torch -> Flax mapping mismatch:\nFlax: {want}\nfrom torch: {got}"
    )
  return out


def _flax_leaf(variables: dict[str, Any], torch_name: str) -> np.ndarray:
  collection, path = _flax_location(torch_name)
  node = variables[collection]
  for key in path:
    node = node[key]
  return np.asarray(node)


def flax_as_torch_names(
  variables: dict[str, Any], names: list[str]
) -> dict[str, np.ndarray]:
  """The Flax values of the named torch tensors, in Flax layout."""
  return {name: _flax_leaf(variables, name) for name in names}


def torch_in_flax_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {name: _to_flax_layout(value) for name, value in state.items()}


def _is_statistic(name: str) -> bool:
  return name.endswith(("running_mean", "running_var"))


def max_relative_differences(
  ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]
) -> dict[str, float]:
  """Per tensor: max |ours - ref| / max |ref| (both in Flax layout)."""
  out = {}
  for name, value in ref.items():
    scale = float(np.max(np.abs(value))) or 1.0
    out[name] = (
      float(
        np.max(np.abs(ours[name].astype(np.float64) - value.astype(np.float64)))
      )
      / scale
    )
  return out


def update_relative_difference(
  ours: dict[str, np.ndarray],
  ref: dict[str, np.ndarray],
  init: dict[str, np.ndarray],
) -> float:
  """||ours - ref|| / ||ref - init|| over all trainable tensors.

  The difference between the two trajectories as a fraction of how far the
  reference has moved from the common initial point: 1e-6 means the updates
  agree to float32 precision, 1 means they share nothing.
  """
  diff = moved = 0.0
  with np.errstate(over="ignore", invalid="ignore"):
    for name, value in ref.items():
      if _is_statistic(name):
        continue
      value = value.astype(np.float64)
      diff += float(np.sum((ours[name].astype(np.float64) - value) ** 2))
      moved += float(np.sum((value - init[name].astype(np.float64)) ** 2))
  return math.sqrt(diff) / max(math.sqrt(moved), 1e-30)


# ---------------------------------------------------------------------------
# The trainers.


@functools.lru_cache(maxsize=4)
def _jax_trainer(
  num_classes: int, lr: float, steps_per_epoch: int, temperature: float
):
  """The project's model, schedule, optimiser and one jitted SGD step.

  The KD weight is an argument of the step, so `ce` (weight 0: the loss is
  CE + 0 * KL, whose value and gradient are CE's exactly) and `ce_kd` share
  one XLA compilation; cached so repeated runs compile once.
  """
  model = models.create_model("preact_resnet18", num_classes, "float32")
  schedule = optim.student_learning_rate(
    lr, DECAY_EPOCHS, DECAY_FACTOR, steps_per_epoch
  )
  tx = optim.student_optimizer(
    schedule, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
  )

  def loss_fn(params, batch_stats, x, y, teacher, kd_weight):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    targets = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    loss = jnp.mean(losses.soft_cross_entropy(logits, targets))
    loss = loss + kd_weight * jnp.mean(
      losses.distillation_kl(logits, teacher, temperature)
    )
    return loss, (logits, updates["batch_stats"])

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, teacher, kd_weight):
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(params, batch_stats, x, y, teacher, kd_weight)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, batch_stats, opt_state, loss, grad_norm, logits

  return model, schedule, tx, step


class _TorchTrainer:
  """PS-KD's PreAct ResNet-18 and PS-KD's SGD, in float32 or float64."""

  def __init__(
    self,
    model,
    dtype,
    lr: float,
    steps_per_epoch: int,
    objective: str,
    temperature: float,
    kd_weight: float,
  ):
    self.model = model.to(dtype).train()
    self.dtype = dtype
    self.opt = torch.optim.SGD(
      self.model.parameters(),
      lr=lr,
      momentum=MOMENTUM,
      nesterov=True,
      weight_decay=WEIGHT_DECAY,
    )
    self.sched = torch.optim.lr_scheduler.MultiStepLR(
      self.opt, [e * steps_per_epoch for e in DECAY_EPOCHS], DECAY_FACTOR
    )
    self.objective, self.temperature = objective, temperature
    self.kd_weight = kd_weight

  def loss(self, logits, y, teacher):
    loss = F.cross_entropy(logits, y)
    if self.objective == "ce_kd":
      tau = self.temperature
      kl = (
        F.kl_div(
          F.log_softmax(logits / tau, dim=1),
          F.log_softmax(teacher / tau, dim=1),
          reduction="none",
          log_target=True,
        )
        .sum(1)
        .mean()
      )
      loss = loss + self.kd_weight * tau**2 * kl
    return loss

  def step(self, x_nhwc: np.ndarray, y: np.ndarray, teacher: np.ndarray):
    """One SGD step; returns (loss, grad norm, lr used, logits as numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    logits = self.model(x.to(self.dtype))
    loss = self.loss(
      logits, torch.from_numpy(y), torch.from_numpy(teacher).to(self.dtype)
    )
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = math.sqrt(
      sum(
        float(p.grad.double().pow(2).sum())
        for p in self.model.parameters()
        if p.grad is not None
      )
    )
    lr = self.opt.param_groups[0]["lr"]
    self.opt.step()
    self.sched.step()
    return (
      float(loss.detach()),
      grad_norm,
      lr,
      logits.detach().double().numpy(),
    )

  def state(self) -> dict[str, np.ndarray]:
    return torch_in_flax_layout(torch_state(self.model))


@contextlib.contextmanager
def _torch_deterministic():
  previous = torch.are_deterministic_algorithms_enabled()
  torch.use_deterministic_algorithms(True)
  try:
    yield
  finally:
    torch.use_deterministic_algorithms(previous)


def _rel(a: float, b: float) -> float:
  if not (math.isfinite(a) and math.isfinite(b)):
    return float("nan")
  return abs(a - b) / max(abs(b), 1e-30)


def _diverged(loss: float, max_logit: float) -> bool:
  return not (
    math.isfinite(loss)
    and math.isfinite(max_logit)
    and abs(loss) <= DIVERGENCE_THRESHOLD
    and max_logit <= DIVERGENCE_THRESHOLD
  )


def _max_abs(z: np.ndarray) -> float:
  return float(np.max(np.abs(z)))


def run_parity(
  *,
  steps: int = 3,
  batch_size: int = 16,
  objective: str = "ce",
  lr: float = 0.1,
  data: str = "random",
  num_classes: int = 10,
  image_size: int = 32,
  num_examples: int | None = None,
  temperature: float = 4.0,
  kd_weight: float = 1.0,
  teacher_scale: float = 8.0,
  teacher_noise: float = 0.5,
  seed: int = 0,
  control64: bool = False,
  keep_going: bool = False,
  verbose: bool = False,
) -> list[dict[str, Any]]:
  """Trains the torch and the Flax PreAct ResNet-18 in lockstep.

  Returns one dict per step with: step, lr (JAX schedule), lr_torch,
  loss_torch, loss_jax, loss_rel, grad_norm_torch, grad_norm_jax,
  grad_norm_rel (loss and gradient at the parameters before the step),
  max_logit_torch, max_logit_jax, logit_rel (max |z_torch - z_jax| /
  max |z_torch| over the batch), and, after the update, param_rel
  (||theta_jax - theta_torch|| / ||theta_torch - theta_0|| over all trainable
  tensors) and param_max_rel (the largest per-tensor max |diff| / max |torch|),
  diverged_torch, diverged_jax, seconds_torch, seconds_jax.

  control64 also trains a float64 copy of the torch model from the same
  start, the float32 noise floor: *_torch64 values, and loss_rel_t32 /
  loss_rel_jax, grad_norm_rel_t32 / grad_norm_rel_jax, param_rel_t32 /
  param_rel_jax (torch float32 and JAX against torch float64, param_rel's
  normalisation by the float64 update).

  The last dict also holds param_rel_by_tensor (per-tensor max relative
  difference JAX vs torch float32, torch names, running statistics
  included). Stops after the step where every framework has diverged (loss
  or logits non-finite or above 1e4), unless keep_going.
  """
  if torch is None:
    raise RuntimeError(SKIP_MESSAGE)
  if objective not in OBJECTIVES:
    raise ValueError(
      f"Unknown objective {objective!r}; use one of {OBJECTIVES}."
    )
  images, labels, num_classes = load_images(
    data,
    num_examples=num_examples or max(steps * batch_size, batch_size),
    num_classes=num_classes,
    image_size=image_size,
    seed=seed,
  )
  inputs = normalise(images)
  teachers = teacher_logits(
    labels, num_classes, teacher_scale, teacher_noise, seed
  )
  n = inputs.shape[0]
  if n < batch_size:
    raise ValueError(f"{data} has {n} images, fewer than batch {batch_size}")
  order = np.random.default_rng(seed).permutation(n)
  steps_per_epoch = n // batch_size  # the remainder is dropped, as PS-KD does

  def batch_ids(step: int) -> np.ndarray:
    start = (step % steps_per_epoch) * batch_size
    return order[start : start + batch_size]

  # torch: PS-KD's model with PyTorch's default initialisation from the seed.
  torch.manual_seed(seed)
  torch_model = torch_reference.PreActResNet18(num_classes)
  init_state = torch_state(torch_model)
  init = torch_in_flax_layout(init_state)
  names = list(init)
  reference64 = None
  if control64:
    reference64 = _TorchTrainer(
      copy.deepcopy(torch_model),
      torch.float64,
      lr,
      steps_per_epoch,
      objective,
      temperature,
      kd_weight,
    )
  reference = _TorchTrainer(
    torch_model,
    torch.float32,
    lr,
    steps_per_epoch,
    objective,
    temperature,
    kd_weight,
  )

  # JAX: the project's model and optimiser, started from torch's values.
  model, schedule, tx, jax_step = _jax_trainer(
    num_classes, float(lr), steps_per_epoch, float(temperature)
  )
  shapes = jax.eval_shape(
    lambda k, x: model.init(k, x, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1,) + inputs.shape[1:], jnp.float32),
  )
  variables = torch_to_flax(init_state, shapes)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = jax.jit(tx.init)(params)  # one compilation, not one per shape
  jax_kd_weight = jnp.float32(kd_weight if objective == "ce_kd" else 0.0)

  records: list[dict[str, Any]] = []
  with _torch_deterministic(), jax.default_matmul_precision("highest"):
    for step in range(steps):
      ids = batch_ids(step)
      x, y, t = inputs[ids], labels[ids], teachers[ids]

      start = time.perf_counter()
      loss_t, grad_norm_t, lr_t, z_t = reference.step(x, y, t)
      torch_s = time.perf_counter() - start

      start = time.perf_counter()
      params, batch_stats, opt_state, loss_j, grad_norm_j, z_j = jax_step(
        params,
        batch_stats,
        opt_state,
        jnp.asarray(x),
        jnp.asarray(y.astype(np.int32)),
        jnp.asarray(t),
        jax_kd_weight,
      )
      loss_j, grad_norm_j = float(loss_j), float(grad_norm_j)
      z_j = np.asarray(z_j, np.float64)
      jax_s = time.perf_counter() - start

      state_t = reference.state()
      state_j = flax_as_torch_names(
        {"params": params, "batch_stats": batch_stats}, names
      )
      diffs = max_relative_differences(state_j, state_t)
      max_t, max_j = _max_abs(z_t), _max_abs(z_j)
      with np.errstate(invalid="ignore"):
        logit_rel = _max_abs(z_t - z_j) / max(max_t, 1e-30)
      record = {
        "step": step + 1,
        "lr": float(schedule(step)),
        "lr_torch": lr_t,
        "loss_torch": loss_t,
        "loss_jax": loss_j,
        "loss_rel": _rel(loss_j, loss_t),
        "grad_norm_torch": grad_norm_t,
        "grad_norm_jax": grad_norm_j,
        "grad_norm_rel": _rel(grad_norm_j, grad_norm_t),
        "max_logit_torch": max_t,
        "max_logit_jax": max_j,
        "logit_rel": logit_rel,
        "param_rel": update_relative_difference(state_j, state_t, init),
        "param_max_rel": max(
          v for k, v in diffs.items() if not _is_statistic(k)
        ),
        "diverged_torch": _diverged(loss_t, max_t),
        "diverged_jax": _diverged(loss_j, max_j),
        "seconds_torch": torch_s,
        "seconds_jax": jax_s,
      }
      diverged = [record["diverged_torch"], record["diverged_jax"]]
      if reference64 is not None:
        loss_d, grad_norm_d, _, z_d = reference64.step(x, y, t)
        state_d = reference64.state()
        max_d = _max_abs(z_d)
        record.update(
          {
            "loss_torch64": loss_d,
            "grad_norm_torch64": grad_norm_d,
            "max_logit_torch64": max_d,
            "loss_rel_t32": _rel(loss_t, loss_d),
            "loss_rel_jax": _rel(loss_j, loss_d),
            "grad_norm_rel_t32": _rel(grad_norm_t, grad_norm_d),
            "grad_norm_rel_jax": _rel(grad_norm_j, grad_norm_d),
            "param_rel_t32": update_relative_difference(state_t, state_d, init),
            "param_rel_jax": update_relative_difference(state_j, state_d, init),
            "diverged_torch64": _diverged(loss_d, max_d),
          }
        )
        diverged.append(record["diverged_torch64"])
      records.append(record)
      if verbose:
        print(format_row(record), flush=True)
      if not keep_going and all(diverged):
        break
  records[-1]["param_rel_by_tensor"] = diffs
  return records


# ---------------------------------------------------------------------------
# Report.


def header(control64: bool = False) -> str:
  head = (
    f"{'step':>4} {'lr':>5} | {'loss torch':>10} {'loss jax':>10} "
    f"{'rel':>7} | {'|g| torch':>10} {'|g| jax':>10} {'rel':>7} | "
    f"{'max|z| t':>9} {'max|z| j':>9} {'z rel':>7} | {'dtheta':>7}"
  )
  if control64:
    head += (
      f" || {'loss t64':>10} {'t32 rel':>7} {'jax rel':>7} | "
      f"{'|g| t64':>10} {'t32 rel':>7} {'jax rel':>7} | "
      f"{'dth t32':>7} {'dth jax':>7}"
    )
  return head


def _num(value: float, width: int, spec: str) -> str:
  if math.isfinite(value):
    return f"{value:>{width}{spec}}"
  return f"{value!s:>{width}}"


def format_row(r: dict[str, Any]) -> str:
  row = (
    f"{r['step']:>4} {r['lr']:>5.3g} | "
    f"{_num(r['loss_torch'], 10, '.5g')} {_num(r['loss_jax'], 10, '.5g')} "
    f"{_num(r['loss_rel'], 7, '.1e')} | "
    f"{_num(r['grad_norm_torch'], 10, '.5g')} "
    f"{_num(r['grad_norm_jax'], 10, '.5g')} "
    f"{_num(r['grad_norm_rel'], 7, '.1e')} | "
    f"{_num(r['max_logit_torch'], 9, '.4g')} "
    f"{_num(r['max_logit_jax'], 9, '.4g')} "
    f"{_num(r['logit_rel'], 7, '.1e')} | "
    f"{_num(r['param_rel'], 7, '.1e')}"
  )
  if "loss_torch64" in r:
    row += (
      f" || {_num(r['loss_torch64'], 10, '.5g')} "
      f"{_num(r['loss_rel_t32'], 7, '.1e')} "
      f"{_num(r['loss_rel_jax'], 7, '.1e')} | "
      f"{_num(r['grad_norm_torch64'], 10, '.5g')} "
      f"{_num(r['grad_norm_rel_t32'], 7, '.1e')} "
      f"{_num(r['grad_norm_rel_jax'], 7, '.1e')} | "
      f"{_num(r['param_rel_t32'], 7, '.1e')} "
      f"{_num(r['param_rel_jax'], 7, '.1e')}"
    )
  return row


LEGEND = (
  "rel = |jax - torch| / |torch|; z rel = max|z_jax - z_torch| / "
  "max|z_torch|; dtheta = ||theta_jax - theta_torch|| / ||theta_torch - "
  "theta_0|| after the step (trainable tensors)"
)
LEGEND64 = (
  "|| columns: torch float64 from the same start (the float32 noise floor); "
  "t32 rel / jax rel = torch float32 / JAX against it; dth t32 / dth jax = "
  "||theta - theta_t64|| / ||theta_t64 - theta_0||"
)


def first_divergence(records: list[dict[str, Any]], side: str) -> int | None:
  """First step whose loss or logits are non-finite or above 1e4."""
  for r in records:
    if r.get(f"diverged_{side}"):
      return r["step"]
  return None


def verdict(
  records: list[dict[str, Any]],
  rtol: float = 1e-3,
  noise_factor: float = 10.0,
  floor: float = 1e-6,
  horizon: float = 0.1,
) -> str:
  """One line: agreement before divergence, and where each side diverges.

  Without the float64 control: JAX agrees when loss and gradient norm agree
  with torch to `rtol` at every step before divergence. With it, the steps
  compared are those before divergence where torch float32 is still within
  `horizon` of torch float64 (param_rel_t32: float32 rounding alone has not
  yet moved the trajectory by that fraction of its displacement; after that
  no float32 run predicts another), and JAX agrees when there its loss,
  gradient norm and parameters are no further from torch float64 than
  noise_factor times torch float32's own distance (or `floor`).
  """
  control = "loss_torch64" in records[0]
  sides = ["torch", "jax"] + (["torch64"] if control else [])
  first = {side: first_divergence(records, side) for side in sides}
  stop = min(
    [s for s in first.values() if s is not None] + [records[-1]["step"] + 1]
  )
  before = [r for r in records if r["step"] < stop]
  where = (
    "no framework diverged"
    if all(v is None for v in first.values())
    else ", ".join(
      f"{side} diverges at step {step}" for side, step in first.items()
    )
  )
  worst = max(
    (max(r["loss_rel"], r["grad_norm_rel"]) for r in before),
    default=float("nan"),
  )
  if not control:
    agree = bool(before) and worst <= rtol
    return (
      f"VERDICT: {'AGREE' if agree else 'DISAGREE'}: loss and gradient "
      f"norm agree to {worst:.1e} (max rel; threshold {rtol:g}) over "
      f"the {len(before)} step(s) before any divergence; {where}."
    )
  chaotic = [r["step"] for r in before if r["param_rel_t32"] > horizon]
  if chaotic:
    before = [r for r in before if r["step"] < chaotic[0]]
  worst = max(
    (max(r["loss_rel"], r["grad_norm_rel"]) for r in before),
    default=float("nan"),
  )
  predictable = (
    f"float32 itself stays within {horizon:g} of float64 up to "
    f"step {before[-1]['step'] if before else 0}"
    if chaotic
    else ""
  )
  keys = ("loss_rel", "grad_norm_rel", "param_rel")
  agree = bool(before) and all(
    r[f"{k}_jax"] <= noise_factor * max(r[f"{k}_t32"], floor)
    for r in before
    for k in keys
  )
  summary = (
    ", ".join(
      f"{k[:-4]} {max(r[k + '_jax'] for r in before):.1e} / "
      f"{max(r[k + '_t32'] for r in before):.1e}"
      for k in keys
    )
    if before
    else "none"
  )
  return (
    f"VERDICT: {'AGREE' if agree else 'DISAGREE'} within float32 noise: "
    f"over the {len(before)} step(s) before any divergence"
    f"{' where ' + predictable if predictable else ''}, JAX vs torch "
    f"differ by up to {worst:.1e} in loss and gradient norm; distance "
    f"from torch float64 (max rel), JAX / torch float32: {summary} "
    f"(agree: JAX <= {noise_factor:g}x torch float32's, floor "
    f"{floor:g}); {where}."
  )


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument(
    "--num_classes",
    type=int,
    default=10,
    help="classes of --data=random (others know theirs)",
  )
  parser.add_argument("--objective", default="ce_kd", choices=OBJECTIVES)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument(
    "--data", default="digits", help="digits | random | folder:PATH"
  )
  parser.add_argument(
    "--image_size", type=int, default=32, help="side of --data=random images"
  )
  parser.add_argument("--temperature", type=float, default=4.0)
  parser.add_argument("--kd_weight", type=float, default=1.0)
  parser.add_argument("--teacher_scale", type=float, default=8.0)
  parser.add_argument("--teacher_noise", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--control64",
    action="store_true",
    help="also train a float64 torch copy: the float32 noise floor",
  )
  parser.add_argument(
    "--keep_going",
    action="store_true",
    help="run all steps even after every framework has diverged",
  )
  parser.add_argument("--out", default="", help="JSON file for the records")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not available():
    print(SKIP_MESSAGE)
    return 0
  print("== torch_parity")
  print(
    f"torch={torch.__version__} jax={jax.__version__} "
    f"backend={jax.default_backend()} torch_threads="
    f"{torch.get_num_threads()} cpus={os.cpu_count()} "
    f"load_average_1min={os.getloadavg()[0]:.2f}"
  )
  print(
    f"data={args.data} objective={args.objective} steps={args.steps} "
    f"batch={args.batch_size} lr={args.lr} momentum={MOMENTUM} nesterov "
    f"weight_decay={WEIGHT_DECAY} float32, train-mode BN, no augmentation"
    + (
      f"; teacher = {args.teacher_scale} * onehot + "
      f"{args.teacher_noise} * N(0,1), tau={args.temperature}, "
      f"weight={args.kd_weight}"
      if args.objective == "ce_kd"
      else ""
    )
  )
  print(LEGEND)
  if args.control64:
    print(LEGEND64)
  print(header(args.control64), flush=True)
  start = time.perf_counter()
  records = run_parity(
    steps=args.steps,
    batch_size=args.batch_size,
    objective=args.objective,
    lr=args.lr,
    data=args.data,
    num_classes=args.num_classes,
    image_size=args.image_size,
    temperature=args.temperature,
    kd_weight=args.kd_weight,
    teacher_scale=args.teacher_scale,
    teacher_noise=args.teacher_noise,
    seed=args.seed,
    control64=args.control64,
    keep_going=args.keep_going,
    verbose=True,
  )
  by_tensor = sorted(
    records[-1]["param_rel_by_tensor"].items(), key=lambda kv: -kv[1]
  )
  print(
    "after the last step, max |jax - torch| / max |torch| of the worst "
    "parameters: "
    + ", ".join(
      f"{k} {v:.1e}"
      for k, v in [kv for kv in by_tensor if not _is_statistic(kv[0])][:3]
    )
    + "; running statistics: "
    + ", ".join(
      f"{k} {v:.1e}"
      for k, v in [kv for kv in by_tensor if _is_statistic(kv[0])][:2]
    )
  )
  print(f"wall {time.perf_counter() - start:.0f} s")
  print(verdict(records))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "records": records}, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
