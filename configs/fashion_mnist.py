"""Real photos offline: a Fashion-MNIST image folder, PS-KD's recipe, short.

  python main.py --config=configs/fashion_mnist.py:/path/to/folder --workdir=W

The folder holds ROOT/train/<class>/*.png (32x32 RGB); with no test folder
the loader holds out a stratified 20% of it as the test split. Schedules are
shortened to 15 epochs with PS-KD's lr decays at the same fractions (1/2 and
3/4 of training); everything else is PS-KD's CIFAR recipe.
"""

from configs import default


def get_config(root: str = "data/fashion_mnist"):
  config = default.get_config()
  config.dataset = f"folder:{root}"
  config.mean = ()  # the folder's own per-channel statistics
  config.std = ()
  config.num_epochs = 15
  config.lr_decay_epochs = (8, 12)
  config.eval_batch_size = 500
  config.log_every_steps = 20
  return config
