"""CIFAR-100, ResNeXt-29 8x64d, PS-KD's recipe.

PS-KD's constructor:
  CifarResNeXt(cardinality=8, depth=29, nlabels=100,
  base_width=64, widen_factor=4)

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
  config.model = "resnext29"
  return config
