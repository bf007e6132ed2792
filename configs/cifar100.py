"""CIFAR-100, PreAct ResNet-18, PS-KD's recipe: 300 epochs per stage."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar100"
  return config
