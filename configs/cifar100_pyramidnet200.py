"""CIFAR-100, PyramidNet-200 (bottleneck, alpha 240), PS-KD's recipe.

PS-KD's constructor:
  PyramidNet(dataset='cifar100', depth=200, alpha=240,
  num_classes=100, bottleneck=True)

Only the model differs from configs/cifar100.py: PS-KD trains every CIFAR
network with the same recipe (see there).
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.model = "pyramidnet200"
  return config
