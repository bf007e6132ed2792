"""CIFAR-100, PreAct ResNet-18, PS-KD's recipe: 300 epochs per stage.

PS-KD gives one CIFAR-100 recipe for every network (its README's commands
and main.py's defaults: batch 128, SGD lr 0.1 with Nesterov momentum 0.9,
weight decay 5e-4, lr x0.1 at epochs 150 and 225); its network.py sets only
the architecture. configs/cifar100_<network>.py therefore change only the
model. What configs/default.py marks as ours stays ours in all of them.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar100"
  # An epoch takes about a second on one H200: a save after each would cost
  # a fifth of the epoch (benchmarks/README.md), so save every 10 minutes
  # (and at each stage's end and on a stop signal, as always).
  config.checkpoint_every_minutes = 10.0
  return config
