"""Defaults shared by every config: docs/method.md's CIFAR-100 recipe.

Which defaults come from PS-KD's published recipe and which are this
project's own choices is listed in README.md ("Defaults and their origin").
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  # cifar10 | cifar100 | digits | folder:/path | tfds:NAME (any TFDS image
  # classification dataset with image and label features)
  config.dataset = "cifar100"
  config.data_dir = ""  # TFDS data dir; empty: $TFDS_DATA_DIR or TFDS's own
  config.download = True  # let TFDS download a missing dataset
  config.image_size = 0  # folder datasets: resize to this size (0: as stored)
  config.data_seed = 0  # seed of the digits train/test split
  config.crop_padding = 4  # random-crop zero padding, pixels
  config.flip = True  # random horizontal flip
  # Normalisation; empty tuples mean "per-channel stats of the train split".
  config.mean = (0.4914, 0.4822, 0.4465)
  config.std = (0.2023, 0.1994, 0.2010)
  # Where the training split lives: "device" (all of it on the devices),
  # "stream" (each step's batch read on the host), or "auto" (stream when
  # the split takes more than device_data_budget_gb per device).
  config.input_pipeline = "auto"
  config.device_data_budget_gb = 4.0
  # Streaming only: random-resized crop to image_size and flip on the host
  # (for images of different sizes, e.g. ImageNet) instead of the device's
  # pad-crop and flip; evaluation then centre-crops to image_size.
  config.host_augment = False
  # With host_augment: PS-KD's ImageNet colour jitter (brightness, contrast,
  # saturation 0.4, random order) and PCA lighting noise (std 0.1) on the
  # crop (aikd_jax/host_augment.py).
  config.host_color_augment = False
  config.stream_workers = 8  # host threads reading and augmenting
  config.stream_prefetch = 2  # batches sent to the devices ahead of use

  # Model and numerics.
  config.model = "preact_resnet18"  # any of aikd_jax.models.MODEL_NAMES
  config.compute_dtype = "float32"  # float32 | bfloat16 (params stay f32)
  config.bank_dtype = "float32"  # float32 | bfloat16
  config.sync_batch_norm = True  # False: per-device statistics (PS-KD)

  # Method: a preset of the objective (aikd_jax/objective.py).
  config.method = "ai_kd"
  # Overrides of the preset's fields; None keeps the preset's value.
  config.alpha_T = config_dict.placeholder(float)
  config.label_smoothing = config_dict.placeholder(float)
  config.lambda_det = config_dict.placeholder(float)
  config.lambda_adv = config_dict.placeholder(float)
  config.lambda_cls = config_dict.placeholder(float)  # CS-KD's weight
  config.temperature = config_dict.placeholder(float)
  config.teacher_mode = config_dict.placeholder(str)  # precomputed | online
  config.teacher_ramp_epochs = config_dict.placeholder(float)
  # Clip the student's gradient to this global norm (0: off); None: the
  # method's (1 with the pre-trained model's terms). The teacher never clips.
  config.grad_clip_norm = config_dict.placeholder(float)

  # Teacher (stage 1): trained with `ce` unless a checkpoint is named.
  config.teacher_checkpoint = ""  # a stage-1 checkpoint directory to reuse
  config.teacher_num_epochs = config_dict.placeholder(int)  # None: num_epochs

  # Optimisation (PS-KD's recipe).
  config.num_epochs = 300
  config.batch_size = 128  # global, split evenly over all devices
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.lr_decay_epochs = (150, 225)
  config.lr_decay_factor = 0.1
  # Off in PS-KD's recipe; available for unstable settings (ours).
  config.warmup_epochs = 0.0  # linear learning-rate warmup from 0

  # Discriminator (this project's choices).
  config.disc_hidden = (256, 256)
  config.disc_learning_rate = 2e-4
  config.disc_b1 = 0.5
  config.disc_b2 = 0.999

  config.seed = 0

  # Bookkeeping: none of these change the result.
  # JAX's persistent compilation cache: "default" (~/.cache/aikd_jax/jax),
  # a folder, or "" for off.
  config.compilation_cache_dir = "default"
  config.eval_batch_size = 1000  # global
  config.log_every_steps = 100
  config.checkpoint_every_epochs = 1
  # > 0: save by wall time instead (at the first epoch end or log step this
  # many minutes after the last save); the stage's end and a stop signal
  # always save. 0: by epochs.
  config.checkpoint_every_minutes = 0.0
  config.keep_checkpoints = 2
  # Steps per call of the jitted step (one compiled loop when above 1):
  # saves the host's launch cost per step on a fast GPU. Every value above
  # 1 gives bitwise the same run; 1 (the plain step) equals them only to
  # float rounding. 0: automatic, K > 1 on a GPU with the training split on
  # the devices, else 1 (aikd_jax/dispatch.py); on a CPU the loop is much
  # slower (README, Performance).
  config.steps_per_dispatch = 0
  return config
