"""CIFAR-100, ResNeXt-29 8x64d, PS-KD's recipe.

PS-KD's constructor:
  CifarResNeXt(cardinality=8, depth=29, nlabels=100,
  base_width=64, widen_factor=4)

Only the model differs from configs/cifar100.py: PS-KD trains every CIFAR
network with the same recipe (see there).
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.model = "resnext29"
  return config
