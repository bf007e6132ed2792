"""End to end: main.py's three stages on real and generated data."""

import json
import os

import e2e_util as u
from e2e_util import read_results
import numpy as np
from PIL import Image
import pytest

# Every test here runs main.py (or the training loop) in a subprocess.
pytestmark = pytest.mark.slow

METRICS = ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc")


def run_main(workdir, *overrides, config="configs/digits.py", timeout=600):
  """main.py in a subprocess, stdout and stderr captured apart."""
  return u.run_main(
    workdir, *overrides, config=config, timeout=timeout, separate_streams=True
  )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """The digits demo exactly as the README runs it."""
  workdir = str(tmp_path_factory.mktemp("digits"))
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc, proc.seconds


def test_digits_demo_runs_three_stages_and_student_learns(digits_run):
  workdir, proc, _ = digits_run
  for stage in ("teacher", "teacher_logits", "student"):
    results = read_results(workdir, stage)
    assert results["complete"] is True
    for key in ("last", "best"):
      for metric in METRICS:
        assert np.isfinite(results[key][metric]), (stage, key, metric)
  student = read_results(workdir, "student")
  assert student["method"] == "ai_kd"
  assert len(student["history"]) == 30
  assert student["last"]["top1_err"] < 10.0  # > 90% test accuracy.
  assert student["best"]["top1_err"] <= student["last"]["top1_err"]
  teacher = read_results(workdir, "teacher")
  assert teacher["last"]["top1_err"] < 10.0
  # The per-epoch history carries every loss term and the discriminator.
  train = student["history"][-1]["train"]
  for name in (
    "loss/prog",
    "loss/det",
    "loss/adv",
    "loss/disc",
    "train/disc_real_acc",
    "train/disc_fake_acc",
  ):
    assert np.isfinite(train[name]), name
  assert 0.0 <= train["train/disc_real_acc"] <= 1.0
  assert "student (ai_kd): last epoch top-1 error" in proc.stdout
  # Epochs are counted from 1 on the console, as in the per-epoch lines.
  best_epoch = student["best"]["epoch"] + 1
  assert f"(epoch {best_epoch}/30). Results:" in proc.stdout


def test_digits_demo_writes_tensorboard_events(digits_run):
  workdir, _, _ = digits_run
  for stage in ("teacher", "student"):
    events = [
      f
      for f in os.listdir(os.path.join(workdir, stage))
      if f.startswith("events.out.tfevents")
    ]
    assert events, stage
    size = os.path.getsize(os.path.join(workdir, stage, events[0]))
    assert size > 1000, (stage, size)


def test_cifar100_config_runs_through_tfds(tmp_path):
  """configs/cifar100.py, shrunk, on TFDS's mocked CIFAR-100."""
  script = f"""
import sys, json
sys.argv = ['x']
import tensorflow_datasets as tfds
from configs import cifar100
from aikd_jax import train
config = cifar100.get_config()
config.model = 'tiny_cnn'
config.num_epochs = 2
config.teacher_num_epochs = 1
config.batch_size = 16
config.eval_batch_size = 32
config.lr_decay_epochs = (1,)
with tfds.testing.mock_data(num_examples=48,
                            policy=tfds.testing.MockPolicy.USE_CODE):
  results = train.train_and_evaluate(config, {str(tmp_path / "wd")!r})
print(json.dumps(results))
"""
  proc = u.run_python("-c", script, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert results["method"] == "ai_kd"
  assert results["steps_per_epoch"] == 3  # 48 examples // batch 16.
  assert len(results["history"]) == 2
  for metric in METRICS:
    assert np.isfinite(results["last"][metric])
  assert os.path.exists(tmp_path / "wd" / "teacher_logits" / "results.json")


def make_image_folder(
  root, classes=("cat", "dog", "owl"), per_class=12, size=16
):
  """A folder dataset whose classes differ by colour, so it is learnable."""
  rng = np.random.default_rng(0)
  for split, count in (("train", per_class), ("test", per_class // 2)):
    for index, name in enumerate(classes):
      os.makedirs(root / split / name)
      for i in range(count):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        pixels[..., index] += 180
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_dataset_end_to_end(tmp_path):
  make_image_folder(tmp_path / "images")
  workdir = tmp_path / "wd"
  proc = run_main(
    workdir,
    f"--config.dataset=folder:{tmp_path / 'images'}",
    "--config.num_epochs=4",
    "--config.batch_size=12",
    "--config.eval_batch_size=18",
    "--config.mean=()",
    "--config.std=()",
    "--config.method=ps_kd",
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = read_results(workdir, "student")
  assert results["method"] == "ps_kd"
  assert results["steps_per_epoch"] == 3  # 36 images // batch 12.
  for metric in METRICS:
    assert np.isfinite(results["last"][metric])
  # ps_kd needs no pre-trained model: stages 1 and 2 are skipped.
  assert not os.path.exists(workdir / "teacher")
  assert "uses no pre-trained model" in proc.stderr


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()
  workdir = tmp_path / "wd"
  proc = run_main(
    workdir, f"--config.data_dir={empty}", config="configs/cifar100.py"
  )
  elapsed = proc.seconds
  assert proc.returncode != 0
  output = proc.stdout + proc.stderr
  assert "TFDS_DATA_DIR" in output and "tfds build" in output
  assert "folder:" in output
  assert elapsed < 60, elapsed  # Import time included; no download retries.
  assert not workdir.exists()  # Nothing written before the data is found.
