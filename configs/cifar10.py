"""CIFAR-10 with the CIFAR-100 recipe."""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.dataset = "cifar10"
  return config
