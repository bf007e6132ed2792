"""Offline demo: scikit-learn's bundled 8x8 digits and the tiny CNN.

Real data that ships with scikit-learn, so it runs anywhere without a
download; all three stages take a couple of minutes on two CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "digits"
  config.model = "tiny_cnn"
  config.mean = ()
  config.std = ()
  config.crop_padding = 1
  config.flip = False  # digits are not mirror-symmetric
  config.num_epochs = 30
  config.batch_size = 64
  config.learning_rate = 0.05
  config.lr_decay_epochs = (15, 23)
  config.eval_batch_size = 512
  config.log_every_steps = 20
  return config
