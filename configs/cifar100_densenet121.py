"""CIFAR-100, DenseNet-121, PS-KD's recipe.

PS-KD's constructor:
  CIFAR_DenseNet121(num_classes=100, bias=True)

Only the model differs from configs/cifar100.py: PS-KD trains every CIFAR
network with the same recipe (see there).
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.model = "densenet121"
  return config
