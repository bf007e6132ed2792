"""CIFAR-10 with the CIFAR-100 recipe."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  return config
