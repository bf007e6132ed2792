"""PyTorch parity of the training dynamics (benchmarks/torch_parity.py).

PS-KD's PreAct ResNet-18 at its real widths, in PyTorch and in Flax from the
same initial parameters, trained for 3 SGD steps (lr 0.1, Nesterov momentum
0.9, coupled weight decay 5e-4: PS-KD's recipe) on the same batches of 16
real 8x8 images (scikit-learn's digits), training-mode BatchNorm, float32.
The JAX side is the project's own model, losses and optimiser.

Tolerances, from measured runs (2-core x86 CPU, torch 2.13 CPU, jax 0.10.2):
- step 1, loss and gradient norm: measured <= 1e-7 (ce and ce_kd); the
  tolerance is 1e-4 because one ReLU whose input is within float32 rounding
  of 0 takes a different side in the two frameworks on some batches (seen:
  gradient norm 1.7e-5 apart on a random-image batch, from one input at
  -6e-7 in torch and +1e-7 in JAX);
- after step 1, the parameters: ||theta_jax - theta_torch|| /
  ||theta_torch - theta_0|| measured 1.4e-6, tolerance 1e-5: the update
  (Nesterov formula, coupled weight decay, learning rate) agrees to float32
  precision;
- later steps amplify such differences, most with ce_kd, whose loss grows
  from 9.5 to 319 in 3 steps at this recipe: step 3 of ce_kd measured loss
  3.3e-5 and gradient norm 7.6e-5 apart, parameters 2.1e-3. A float64 torch
  run from the same start shows that this is torch's own float32 error (torch
  float32 is 8.4e-5 and 2.1e-3 from float64 there, JAX 7.9e-6 and 1.8e-4,
  caused by one ReLU flip after torch's first block's bn1 at step 2). Hence
  rtol 1e-3 at step 3 of ce_kd and 1e-4 elsewhere, and bounds on that
  parameter distance of 1e-4 (ce, measured 5.3e-6) and 2e-2 (ce_kd).
- per tensor after the last step, max |jax - torch| / max |torch|: ce
  measured <= 7.5e-6 on the five tensors below, bound 1e-4; ce_kd measured
  <= 1.7e-4 on the last block and the head, bound 1e-3, while its stem conv
  (1.4e-2, the channel of torch's ReLU flip) is left to the global bound.
"""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

sys.path.insert(
  0,
  os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
  ),
)
import torch_parity  # noqa: E402

# Per-step rtol of the loss and of the global gradient norm (see above).
_RTOL = {"ce": (1e-4, 1e-4, 1e-4), "ce_kd": (1e-4, 1e-4, 1e-3)}
# ||theta_jax - theta_torch|| / ||theta_torch - theta_0|| after the last step.
_PARAM_TOL = {"ce": 1e-4, "ce_kd": 2e-2}
# Per tensor after the last step: max |jax - torch| / max |torch|, on the
# stem, the last block's second conv and BN scale, and the head.
_TENSOR_TOL = {"ce": 1e-4, "ce_kd": 1e-3}
_TENSORS = {
  "ce": (
    "conv1.weight",
    "layers.7.conv2.weight",
    "layers.7.bn2.weight",
    "linear.weight",
    "linear.bias",
  ),
  "ce_kd": (
    "layers.7.conv2.weight",
    "layers.7.bn2.weight",
    "linear.weight",
    "linear.bias",
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ce", "ce_kd"])
def test_torch_and_flax_train_alike(objective):
  records = torch_parity.run_parity(
    steps=3, batch_size=16, objective=objective, lr=0.1, data="digits", seed=0
  )
  assert [r["step"] for r in records] == [1, 2, 3]
  for r, rtol in zip(records, _RTOL[objective]):
    msg = torch_parity.format_row(r)
    assert r["lr"] == pytest.approx(0.1) and r["lr_torch"] == 0.1, msg
    assert np.isfinite([r["loss_jax"], r["loss_torch"]]).all(), msg
    assert r["loss_rel"] <= rtol, msg
    assert r["grad_norm_rel"] <= rtol, msg
  first = records[0]
  # The forward pass (logits before any update) agrees to float32 precision.
  assert first["logit_rel"] <= 1e-5, torch_parity.format_row(first)
  assert first["param_rel"] <= 1e-5, torch_parity.format_row(first)
  last = records[-1]
  assert last["param_rel"] <= _PARAM_TOL[objective], torch_parity.format_row(
    last
  )
  by_tensor = last["param_rel_by_tensor"]
  for name in _TENSORS[objective]:
    assert by_tensor[name] <= _TENSOR_TOL[objective], (name, by_tensor[name])
