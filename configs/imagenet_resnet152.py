"""ImageNet (ILSVRC 2012) with ResNet-152: PS-KD's ImageNet setting, streamed.

  python main.py --config=configs/imagenet_resnet152.py --workdir=W \
    --config.data_dir=DIR  # a TFDS copy prepared as ArrayRecord

From PS-KD's code (github.com/lgcnsai/PS-KD-Pytorch, loader/
custom_dataloader.py and main.py): training views are RandomResizedCrop(224),
a horizontal flip, its colour jitter (brightness, contrast and saturation
0.4, in a random order; its own jitter, not torchvision's ColorJitter) and
PCA lighting noise (alphastd 0.1), which the host augmentation here follows;
evaluation views Resize(256) and CenterCrop(224), normalised with the
ImageNet channel statistics below; SGD with Nesterov momentum 0.9; alpha_T
0.8. Its command-line defaults are the CIFAR ones (300 epochs, lr decays at
150 and 225, weight decay 5e-4) and it has no ImageNet preset, so the
schedule here is the usual 90-epoch ResNet one (batch 256, lr 0.1 divided
by 10 at epochs 30 and 60, weight decay 1e-4), not checked against the
paper's text: change it if the paper says otherwise.

The split (about 140 GB decoded) does not fit on the devices, so batches
are streamed: crop, flip and the colour noise run on the host
(benchmarks/input_pipeline.py measures how many host cores that takes per
accelerator).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "tfds:imagenet2012"
  config.model = "resnet152"
  config.input_pipeline = "stream"
  config.host_augment = True
  config.host_color_augment = True
  config.image_size = 224
  config.mean = (0.485, 0.456, 0.406)
  config.std = (0.229, 0.224, 0.225)
  config.crop_padding = 0
  config.num_epochs = 90
  config.batch_size = 256
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.lr_decay_epochs = (30, 60)
  config.eval_batch_size = 512
  config.log_every_steps = 100
  config.stream_workers = 32
  return config
