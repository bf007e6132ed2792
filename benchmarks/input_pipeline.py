"""Host cost of an ImageNet training view: JPEG decode + random-resized crop.

  python benchmarks/input_pipeline.py                  # 1 and all threads
  python benchmarks/input_pipeline.py --threads=1,2 --num_images=256
  python benchmarks/input_pipeline.py --color_augment  # + jitter, lighting

What runs: the streaming pipeline's own per-example work
(`host_augment.train_view`: random-resized crop to --size and flip, keyed
by seed, step and example id; with --color_augment also
`host_augment.color_augment`, as host_color_augment=True runs it) after a
Pillow JPEG decode, on synthetic JPEGs of ImageNet's typical size (a
smooth random field, --height x --width, quality 90; nothing is
downloaded), read through grain's
MapDataset with N threads exactly as `streaming.train_batches` reads a
source. Reports images/s with N threads and images/s per thread; divide an
accelerator's training images/s by the per-core figure to size its hosts.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

import common  # noqa: F401  (puts the repository on sys.path)
import grain
import numpy as np
from PIL import Image

from aikd_jax import host_augment


def synthetic_jpegs(count: int, height: int, width: int) -> list[bytes]:
  """`count` distinct JPEGs with photo-like (smooth, not noise) content."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def images_per_second(
  jpegs: list[bytes], threads: int, size: int, repeats: int, color: bool
) -> float:
  """Decode + train view of every JPEG `repeats` times with `threads`."""

  def load(index: int) -> np.ndarray:
    data = jpegs[int(index) % len(jpegs)]
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    rng = host_augment.view_rng(0, 0, int(index))
    view = host_augment.train_view(image, size, rng, flip=True)
    if color:
      rng = host_augment.color_rng(0, 0, int(index))
      view = host_augment.color_augment(view, rng)
    return view

  count = len(jpegs) * repeats
  dataset = grain.MapDataset.source(np.arange(count)).map(load).batch(32)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64)
  start = time.perf_counter()
  seen = sum(len(batch) for batch in dataset.to_iter_dataset(options))
  return seen / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--threads", default="")
  parser.add_argument(
    "--color_augment",
    action="store_true",
    help="add the colour jitter and lighting noise (host_color_augment)",
  )
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0))
  threads = [int(t) for t in args.threads.split(",") if t] or sorted({1, cores})
  jpegs = synthetic_jpegs(args.num_images, args.height, args.width)
  print(
    f"{platform.processor() or platform.machine()}, {cores} cores visible; "
    f"{args.num_images} JPEGs of {args.height}x{args.width} "
    f"(mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB), "
    f"random-resized crop to {args.size} + flip"
    + (" + colour jitter + lighting" if args.color_augment else "")
  )
  color = args.color_augment
  images_per_second(jpegs[:8], 1, args.size, 1, color)  # warm-up
  for n in threads:
    rate = images_per_second(jpegs, n, args.size, args.repeats, color)
    print(f"threads={n}: {rate:7.1f} images/s, {rate / n:7.1f} per thread")


if __name__ == "__main__":
  main()
