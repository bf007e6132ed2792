"""CIFAR-100, PyramidNet-200 with ShakeDrop, PS-KD's recipe.

PS-KD's constructor:
  PyramidNet_ShakeDrop(dataset='cifar100', depth=200,
  alpha=240, num_classes=100, bottleneck=True)

PS-KD gives one CIFAR-100 recipe for every network (its README's commands
and main.py's defaults: batch 128, SGD lr 0.1 with Nesterov momentum 0.9,
weight decay 5e-4, lr x0.1 at epochs 150 and 225); its network.py sets only
the architecture per network. So only the model differs from
configs/cifar100.py. Everything else that configs/default.py marks as ours
stays ours here too.
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.model = "pyramidnet200_shakedrop"
  return config
