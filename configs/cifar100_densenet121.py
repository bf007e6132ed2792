"""CIFAR-100, DenseNet-121, PS-KD's recipe.

PS-KD's constructor:
  CIFAR_DenseNet121(num_classes=100, bias=True)

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
  config.model = "densenet121"
  return config
