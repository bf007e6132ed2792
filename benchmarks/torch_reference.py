"""PyTorch references of the `ai_kd` train step, for throughput comparisons.

  python benchmarks/torch_reference.py --batch_size=128
  python benchmarks/torch_reference.py --variants=fast --compile=on

Both variants run the same step as the JAX `ai_kd` preset (docs/method.md),
written here from the spec: PS-KD's PreAct ResNet-18 (or the tiny CNN),
progressive targets from a prediction bank (alpha_T 0.8), KL to precomputed
teacher logits (tau 4, weight 1), a discriminator MLP C -> 256 -> 256 -> 1 with
LeakyReLU(0.2) trained with Adam(2e-4, betas 0.5/0.999) on softplus losses, the
non-saturating generator loss weighted 0.1, SGD (Nesterov, momentum 0.9, coupled
weight decay 5e-4, lr 0.1), random crop (4-pixel zero padding) + horizontal flip
+ normalisation. One forward pass gives both models' gradients (the generator
term sees the discriminator's parameters detached), and the bank row of each
example is set to the train-mode softmax taken before the update.

Variants:
  ps-kd style: float32, NCHW; the prediction bank and the teacher logits are
    CPU tensors, read and written per step (`.to(device)` / `.cpu()` of the
    softmax, a host round trip every step); images are augmented on the CPU
    image by image, as torchvision transforms in a Dataset would (here in the
    main process, without DataLoader workers to overlap it with the step).
  fast: bf16 autocast on CUDA (float32 on CPU), channels_last, images, bank and
    teacher logits on the device, augmentation on the device for the whole
    batch, cudnn.benchmark, fused Adam, torch.compile of the model when
    --compile is on (default: on with CUDA, off on CPU where it compiles
    slowly).

Without PyTorch installed, prints a skip message and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

try:
  import torch
  import torch.nn as nn
  import torch.nn.functional as F
except ImportError:  # PyTorch is optional for this project.
  torch = None

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
VARIANTS = ("ps-kd style", "fast")
SKIP_MESSAGE = (
  "PyTorch is not installed: skipping the torch references "
  "(pip install torch to run them)."
)


def available() -> bool:
  return torch is not None


# ---------------------------------------------------------------------------
# Models (only defined when torch is present).

if torch is not None:

  class PreActBlock(nn.Module):
    """Pre-activation basic block; the identity shortcut is relu(bn1(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(in_planes)
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.shortcut = None
      if stride != 1 or in_planes != planes:
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
      out = F.relu(self.bn1(x))
      shortcut = out if self.shortcut is None else self.shortcut(out)
      h = self.conv1(out)
      h = self.conv2(F.relu(self.bn2(h)))
      return h + shortcut

  class PreActResNet18(nn.Module):
    """docs/method.md's PreAct ResNet-18: stem, BN, ReLU, [2,2,2,2] blocks."""

    def __init__(self, num_classes: int):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      layers, in_planes = [], 64
      for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
        for block in range(2):
          layers.append(
            PreActBlock(in_planes, planes, stride if block == 0 else 1)
          )
          in_planes = planes
      self.layers = nn.Sequential(*layers)
      self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.layers(out)
      out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # the 4x4 pool at 32px
      return self.linear(out)

  class TinyCNN(nn.Module):
    """The library's tiny CNN: two conv-BN-ReLU layers, mean pool, linear."""

    def __init__(self, num_classes: int):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      self.conv2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(32)
      self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = F.relu(self.bn2(self.conv2(out)))
      return self.linear(out.mean(dim=(2, 3)))

  def make_discriminator(num_classes: int) -> nn.Module:
    return nn.Sequential(
      nn.Linear(num_classes, 256),
      nn.LeakyReLU(0.2),
      nn.Linear(256, 256),
      nn.LeakyReLU(0.2),
      nn.Linear(256, 1),
    )

  def make_model(name: str, num_classes: int) -> nn.Module:
    if name == "preact_resnet18":
      return PreActResNet18(num_classes)
    if name == "tiny_cnn":
      return TinyCNN(num_classes)
    raise ValueError(
      f"Unknown model {name!r}; use preact_resnet18 or tiny_cnn."
    )


# ---------------------------------------------------------------------------
# The step.


class _Objective:
  """ai_kd's constants (docs/method.md defaults)."""

  alpha_T = 0.8
  temperature = 4.0
  lambda_det = 1.0
  lambda_adv = 0.1
  num_epochs = 300
  epoch = 1  # any fixed epoch: alpha only scales the targets


def ai_kd_loss(logits, labels, prev_probs, teacher_logits, disc, alpha: float):
  """Total loss (student + discriminator) and the student's softmax.

  Backpropagating the sum gives each model its own gradient: the generator
  term calls the discriminator with detached parameters, the discriminator
  term sees the student's probabilities detached.
  """
  obj = _Objective
  logits = logits.float()
  log_p = F.log_softmax(logits, dim=1)
  onehot = F.one_hot(labels, logits.shape[1]).float()
  targets = (1.0 - alpha) * onehot + alpha * prev_probs
  l_prog = -(targets * log_p).sum(1).mean()
  tau = obj.temperature
  l_det = (
    tau**2
    * F.kl_div(
      F.log_softmax(logits / tau, dim=1),
      F.log_softmax(teacher_logits / tau, dim=1),
      reduction="none",
      log_target=True,
    )
    .sum(1)
    .mean()
  )
  probs = log_p.exp()
  frozen = {k: v.detach() for k, v in disc.named_parameters()}
  fooled = torch.func.functional_call(disc, frozen, (probs,)).squeeze(-1)
  l_adv = F.softplus(-fooled).mean()
  real = disc(F.softmax(teacher_logits, dim=1)).squeeze(-1)
  fake = disc(probs.detach()).squeeze(-1)
  l_disc = (F.softplus(-real) + F.softplus(fake)).mean()
  total = l_prog + obj.lambda_det * l_det + obj.lambda_adv * l_adv + l_disc
  return total, probs


class Reference:
  """One variant's models, optimisers, data and banks; `run(k)` does k steps."""

  def __init__(
    self,
    variant: str,
    *,
    batch_size: int,
    model_name: str,
    num_examples: int,
    num_classes: int,
    compile_mode: str,
    seed: int,
  ):
    if variant not in VARIANTS:
      raise ValueError(f"Unknown variant {variant!r}; use one of {VARIANTS}.")
    self.variant, self.batch_size = variant, batch_size
    self.num_examples = num_examples
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = self.device.type == "cuda"
    fast = variant == "fast"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int64)
    teacher = (3.0 * rng.standard_normal((num_examples, num_classes))).astype(
      np.float32
    )
    bank = np.zeros((num_examples, num_classes), np.float32)
    bank[np.arange(num_examples), labels] = 1.0

    self.model = make_model(model_name, num_classes).to(self.device).train()
    self.disc = make_discriminator(num_classes).to(self.device)
    self.opt = torch.optim.SGD(
      self.model.parameters(),
      lr=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
    )
    self.disc_opt = torch.optim.Adam(
      self.disc.parameters(),
      lr=2e-4,
      betas=(0.5, 0.999),
      **({"fused": True} if fast and cuda else {}),
    )
    obj = _Objective
    self.alpha = obj.alpha_T * (obj.epoch + 1) / obj.num_epochs
    self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(STD).view(1, 3, 1, 1)
    self.autocast = contextlib.nullcontext
    self.dtype = "float32"
    self.compiled = False

    if fast:
      if cuda:
        torch.backends.cudnn.benchmark = True
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        self.dtype = "bfloat16 autocast"
      self.model = self.model.to(memory_format=torch.channels_last)
      use_compile = compile_mode == "on" or (compile_mode == "auto" and cuda)
      if use_compile:
        self.model = torch.compile(self.model)
        self.compiled = True
      self.images = torch.from_numpy(images).to(self.device)  # NHWC uint8
      self.labels = torch.from_numpy(labels).to(self.device)
      self.teacher = torch.from_numpy(teacher).to(self.device)
      self.bank = torch.from_numpy(bank).to(self.device)
      self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
      self.order = torch.randperm(num_examples, device=self.device)
      self.arange = torch.arange(32, device=self.device)
    else:
      self.images, self.labels = images, torch.from_numpy(labels)
      self.teacher, self.bank = (
        torch.from_numpy(teacher),
        torch.from_numpy(bank),
      )
      self.order = rng.permutation(num_examples)
      self.rng = rng
    self.position = 0

  # -- batches --------------------------------------------------------------

  def _next_ids(self):
    if self.position + self.batch_size > self.num_examples:
      self.position = 0
    ids = self.order[self.position : self.position + self.batch_size]
    self.position += self.batch_size
    return ids

  def _augment_host(self, ids: np.ndarray):
    """Per image, as RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor +
    Normalize would run in a Dataset's __getitem__; then collated."""
    out = []
    for i in ids:
      image = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # CHW uint8
      padded = F.pad(image, (4, 4, 4, 4))
      y, x = self.rng.integers(0, 9, 2)
      crop = padded[:, y : y + 32, x : x + 32]
      if self.rng.random() < 0.5:
        crop = crop.flip(-1)
      tensor = crop.float().div_(255.0)
      out.append((tensor - self.mean[0]) / self.std[0])
    return torch.stack(out)

  def _augment_device(self, ids):
    """The whole batch on the device: zero pad, gather the crop, flip."""
    batch = self.images[ids]  # [B, 32, 32, 3] uint8
    padded = F.pad(batch, (0, 0, 4, 4, 4, 4))  # zeros, pixel space
    b = batch.shape[0]
    dy = torch.randint(0, 9, (b,), device=self.device)
    dx = torch.randint(0, 9, (b,), device=self.device)
    flip = torch.rand(b, device=self.device) < 0.5
    rows = dy[:, None] + self.arange[None, :]
    cols = torch.where(
      flip[:, None],
      dx[:, None] + 31 - self.arange[None, :],
      dx[:, None] + self.arange[None, :],
    )
    crop = padded[
      torch.arange(b, device=self.device)[:, None, None],
      rows[:, :, None],
      cols[:, None, :],
    ]  # [B, 32, 32, 3]
    # NHWC memory viewed as NCHW is exactly channels_last.
    x = crop.permute(0, 3, 1, 2).float().div_(255.0)
    return ((x - self.mean) / self.std).contiguous(
      memory_format=torch.channels_last
    )

  # -- one step -------------------------------------------------------------

  def step(self) -> None:
    ids = self._next_ids()
    if self.variant == "fast":
      x = self._augment_device(ids)
      y, prev, teacher = self.labels[ids], self.bank[ids], self.teacher[ids]
    else:
      ids_t = torch.from_numpy(ids)
      x = self._augment_host(ids).to(self.device)
      y = self.labels[ids_t].to(self.device)
      prev = self.bank[ids_t].to(self.device)
      teacher = self.teacher[ids_t].to(self.device)
    with self.autocast():
      logits = self.model(x)
    loss, probs = ai_kd_loss(logits, y, prev, teacher, self.disc, self.alpha)
    self.opt.zero_grad(set_to_none=True)
    self.disc_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.disc_opt.step()
    if self.variant == "fast":
      self.bank[ids] = probs.detach()
    else:
      self.bank[ids_t] = probs.detach().cpu()  # a host sync every step
    self.last_loss = loss

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def run(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.step()
    self.sync()


def measure(
  variant: str,
  *,
  batch_size: int,
  model_name: str = "preact_resnet18",
  num_examples: int = 50_000,
  num_classes: int = 100,
  steps_per_run: int = 10,
  warmup: int = 1,
  repeats: int = 5,
  compile_mode: str = "auto",
  seed: int = 0,
) -> dict[str, Any]:
  """Images/sec of one variant: the median of `repeats` runs of k steps."""
  ref = Reference(
    variant,
    batch_size=batch_size,
    model_name=model_name,
    num_examples=num_examples,
    num_classes=num_classes,
    compile_mode=compile_mode,
    seed=seed,
  )
  start = time.perf_counter()
  ref.run(1)
  first = time.perf_counter() - start
  for _ in range(warmup):
    ref.run(steps_per_run)
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    ref.run(steps_per_run)
    per_step.append((time.perf_counter() - start) / steps_per_run)
  median = statistics.median(per_step)
  finite = bool(torch.isfinite(ref.last_loss).item())
  return {
    "variant": variant,
    "framework": "torch",
    "torch": torch.__version__,
    "device": (
      torch.cuda.get_device_name(0) if ref.device.type == "cuda" else "cpu"
    ),
    "dtype": ref.dtype,
    "memory_format": "channels_last" if variant == "fast" else "NCHW",
    "bank": "device" if variant == "fast" else "host (CPU tensor)",
    "augmentation": (
      "device, whole batch"
      if variant == "fast"
      else "host, per image, main process"
    ),
    "torch_compile": ref.compiled,
    "batch_size": batch_size,
    "model": model_name,
    "first_call_s": first,
    "step_s": median,
    "step_s_runs": per_step,
    "images_per_s": batch_size / median,
    "loss_finite": finite,
    "cpu_threads": torch.get_num_threads(),
  }


def describe(result: dict[str, Any]) -> str:
  return (
    f"torch {result['variant']:<11} {result['images_per_s']:>10.1f} "
    f"images/s  ({1e3 * result['step_s']:.2f} ms/step; "
    f"{result['dtype']}, {result['memory_format']}, bank "
    f"{result['bank']}, augmentation {result['augmentation']}, "
    f"torch.compile {'on' if result['torch_compile'] else 'off'}, "
    f"first call {result['first_call_s']:.1f}s)"
  )


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument(
    "--variants",
    default="ps-kd style,fast",
    help="comma-separated: 'ps-kd style', 'fast'",
  )
  parser.add_argument(
    "--model",
    default="preact_resnet18",
    choices=("preact_resnet18", "tiny_cnn"),
  )
  parser.add_argument("--num_examples", type=int, default=50_000)
  parser.add_argument("--steps_per_run", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--compile",
    default="auto",
    choices=("auto", "on", "off"),
    help="torch.compile the fast variant's model "
    "(auto: on with CUDA, off on CPU)",
  )
  parser.add_argument("--out", default="", help="JSON file for the figures")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not available():
    print(SKIP_MESSAGE)
    return 0
  cuda = torch.cuda.is_available()
  print("== torch_reference")
  print(
    f"torch={torch.__version__} device="
    f"{torch.cuda.get_device_name(0) if cuda else 'cpu'} "
    f"threads={torch.get_num_threads()} batch={args.batch_size} "
    f"model={args.model} load_average_1min={os.getloadavg()[0]:.2f} "
    f"cpus={os.cpu_count()}"
  )
  if not cuda:
    print(
      "note: no CUDA: the fast variant runs in float32 (no bf16 "
      "autocast on CPU)."
    )
  results = []
  for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
    result = measure(
      variant,
      batch_size=args.batch_size,
      model_name=args.model,
      num_examples=args.num_examples,
      steps_per_run=args.steps_per_run,
      warmup=args.warmup,
      repeats=args.repeats,
      compile_mode=args.compile,
    )
    results.append(result)
    print(describe(result), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"results": results}, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
