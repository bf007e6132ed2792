"""The real training loop's cost per epoch vs its steps timed alone; eval speed.

  python benchmarks/loop_overhead.py                       # PreAct ResNet-18
  python benchmarks/loop_overhead.py --model=tiny_cnn --batch_size=64 \
      --num_examples=4096 --num_test=1024                  # quick CPU run

What runs: `aikd_jax.train._Trainer.run` (the student stage's epoch loop,
unchanged) for --epochs epochs on a synthetic in-memory dataset (random uint8
CIFAR-shaped images, 100 classes; an `aikd_jax.data.Dataset`) placed with
`train.place_dataset`, in a temporary workdir. The loop does everything it does in a real run: on-device
augmentation and bank updates inside the step, a metric fetch + NaN check
every --log_every_steps steps and at each epoch's end, TensorBoard/console
scalars, an evaluation on the test split after every epoch, and an
asynchronous orbax checkpoint after every epoch (checkpoint_every_epochs=1).
The teacher is not trained: ai_kd reads random logits from a teacher bank
(precomputed teacher), ai_kd_online uses a freshly initialised teacher.

What is counted (the instrumentation only wraps the trainer instance's
`_end_epoch`, `_flush` and checkpoint `save` to take timestamps; the library
code is untouched):
  loop epoch  = wall time from the end of epoch k-1's evaluation to the end
                of epoch k's evaluation, i.e. one whole steady-state epoch:
                the checkpoint save issued after epoch k-1, all steps of
                epoch k (dispatch and execution), every metric fetch, and
                epoch k's evaluation. Both ends are full device syncs (the
                evaluation fetches logits that depend on the last step).
                Median over k = 2 .. E-1 (E = --epochs, default 4; epoch 0
                holds the compilations, epoch 1's window the first
                checkpoint save); compilations inside are counted and
                printed.
  steps alone = the same jitted step (built by train_step.make_train_step
                from the trainer's own StepConfig, model and initial carry),
                run steps_per_epoch times back to back and blocked only at
                the end; median of --repeats such epochs, half timed before
                the loop and half after it, so drifting load biases neither.
  loop/steps time ratio = loop epoch / steps alone.
Also printed: the first epoch (initial state, both compilations, first
checkpoint), the tail after the last evaluation (final checkpoint save and
wait, results file), and the evaluation throughput: images/sec of the
predict fn (`train_step.make_predict_fn` as the trainer builds it) over the
whole test split, median of --repeats calls after a compiling call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """The fields of a dataset that `train.place_dataset` reads."""

  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, H, W, C]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  image_shape: tuple[int, ...]
  name: str = "synthetic"


def _register_stand_ins() -> list[str]:
  """Registers stand-ins for modules that train.py imports but may be absent.

  Only for this benchmark, and only for modules that cannot be imported:
  - aikd_jax.data: the benchmark builds its dataset in memory and never
    calls it;
  - ml_collections (configs/default.py): a dict with attribute access;
  - clu (metric writers, ReportProgress): a writer that logs scalars through
    absl and a ReportProgress with the same call/`timed` interface. A GPU
    image without TensorFlow cannot import clu's TensorBoard writer; with the
    stand-in the loop writes no event files, so its small cost is missing.
  Returns a note per stand-in.
  """
  notes = []
  try:
    from aikd_jax import data  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    import aikd_jax  # pylint: disable=g-import-not-at-top
    stub = types.ModuleType("aikd_jax.data")
    stub.Dataset = SyntheticDataset
    stub.KNOWN_DATASETS = ("cifar10", "cifar100")

    class DatasetUnavailableError(RuntimeError):
      pass

    def channel_stats(images):
      x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
      return tuple(x.mean(0)), tuple(x.std(0))

    def unavailable(*args, **kwargs):
      raise DatasetUnavailableError("stand-in aikd_jax.data (benchmark)")

    stub.DatasetUnavailableError = DatasetUnavailableError
    stub.channel_stats = channel_stats
    stub.load_dataset = unavailable
    stub.check_dataset_available = lambda *a, **k: None
    sys.modules["aikd_jax.data"] = stub
    aikd_jax.data = stub
    notes.append(f"aikd_jax.data ({error})")

  try:
    import ml_collections  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    import json  # pylint: disable=g-import-not-at-top

    class ConfigDict(dict):
      __getattr__ = dict.__getitem__
      __setattr__ = dict.__setitem__

      def to_json(self):
        return json.dumps(self)

    ml = types.ModuleType("ml_collections")
    cd = types.ModuleType("ml_collections.config_dict")
    ml.ConfigDict = cd.ConfigDict = ConfigDict
    cd.placeholder = lambda field_type: None
    ml.config_dict = cd
    sys.modules["ml_collections"] = ml
    sys.modules["ml_collections.config_dict"] = cd
    notes.append(f"ml_collections ({error})")

  try:
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    import contextlib  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    class LoggingWriter:

      def __init__(self, *args, **kwargs):
        del args, kwargs

      def write_scalars(self, step, scalars):
        logging.info("[%d] %s", step, ", ".join(
            f"{k}={float(v):.6g}" for k, v in scalars.items()))

      def flush(self):
        pass

    class ReportProgress:

      def __init__(self, *, num_train_steps=None, writer=None,
                   every_steps=None, every_secs=60.0):
        self._writer, self._every = writer, every_steps
        self._last_step, self._last_time = None, time.monotonic()
        del num_train_steps, every_secs

      def __call__(self, step):
        if self._every and step % self._every == 0:
          now = time.monotonic()
          if self._last_step is not None and self._writer is not None:
            self._writer.write_scalars(step, {
                "steps_per_sec": (step - self._last_step) /
                                 (now - self._last_time)})
          self._last_step, self._last_time = step, now
          return True
        return False

      @contextlib.contextmanager
      def timed(self, name):
        del name
        yield

    clu = types.ModuleType("clu")
    mw = types.ModuleType("clu.metric_writers")
    pa = types.ModuleType("clu.periodic_actions")
    mw.create_default_writer = lambda *a, **k: LoggingWriter()
    pa.ReportProgress = ReportProgress
    clu.metric_writers, clu.periodic_actions = mw, pa
    sys.modules.update({"clu": clu, "clu.metric_writers": mw,
                        "clu.periodic_actions": pa})
    notes.append(f"clu ({error}; no TensorBoard event files are written)")
  return notes


def _import_train():
  """Imports aikd_jax.train; returns (module, notes on stand-ins)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")  # as main.py: TF stays off GPUs
  except ImportError:
    pass
  notes = _register_stand_ins()
  from aikd_jax import train  # pylint: disable=g-import-not-at-top
  return train, notes


def _make_dataset(train_images, train_labels, test_images, test_labels):
  """The library's data.Dataset of these arrays (or the stand-in's fields)."""
  from aikd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if data_lib.Dataset is SyntheticDataset:
    return SyntheticDataset(train_images, train_labels, test_images,
                            test_labels, common.CIFAR_CLASSES,
                            common.CIFAR_SHAPE)
  return data_lib.Dataset(name="synthetic", train_images=train_images,
                          train_labels=train_labels, test_images=test_images,
                          test_labels=test_labels,
                          num_classes=common.CIFAR_CLASSES)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="preact_resnet18",
                      choices=("preact_resnet18", "tiny_cnn"))
  parser.add_argument("--method", default="ai_kd")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--eval_batch_size", type=int, default=1000)
  parser.add_argument("--num_examples", type=int, default=common.CIFAR_TRAIN)
  parser.add_argument("--num_test", type=int, default=common.CIFAR_TEST)
  parser.add_argument("--epochs", type=int, default=4,
                      help="epochs of the loop; epochs 2..E-1 are timed")
  parser.add_argument("--log_every_steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=4,
                      help="timed epochs of steps alone (half before the "
                      "loop, half after) and timed eval passes")
  parser.add_argument("--workdir", default="",
                      help="where the loop writes (default: a temp dir, "
                      "removed afterwards)")
  parser.add_argument("--out", default="", help="JSON file for the figures")
  return parser.parse_args(argv)


def _config(args):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model = args.model
  config.method = args.method
  config.compute_dtype = args.dtype
  config.batch_size = args.batch_size
  config.eval_batch_size = args.eval_batch_size
  config.num_epochs = args.epochs
  config.log_every_steps = args.log_every_steps
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 2
  config.dataset = "cifar100"  # only a name here; the data is synthetic
  return config


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.epochs < 2:
    raise SystemExit("--epochs must be at least 2 (the last one is timed).")
  try:
    train, stand_ins = _import_train()
  except ImportError as error:
    print(f"SKIP loop_overhead: cannot import aikd_jax.train ({error}).")
    return 0
  from aikd_jax import run_config  # pylint: disable=g-import-not-at-top
  config = _config(args)
  objective = run_config.validate(config)
  mesh = banks.data_mesh()
  report = common.print_header(
      "loop_overhead", model=args.model, method=args.method,
      dtype=args.dtype, batch_size=args.batch_size,
      eval_batch_size=args.eval_batch_size, num_examples=args.num_examples,
      num_test=args.num_test, epochs=args.epochs,
      log_every_steps=args.log_every_steps, repeats=args.repeats,
      mesh_devices=mesh.devices.size)
  for note in stand_ins:
    print(f"note: benchmark stand-in registered for missing module {note}")
  report["stand_ins"] = stand_ins
  counter = common.CompileCounter.get()

  train_images, train_labels = common.synthetic_arrays(args.num_examples,
                                                       seed=0)
  test_images, test_labels = common.synthetic_arrays(args.num_test, seed=1)
  dataset = _make_dataset(train_images, train_labels, test_images,
                          test_labels)
  data = train.place_dataset(dataset, mesh, config)

  workdir = args.workdir or tempfile.mkdtemp(prefix="aikd_loop_overhead_")
  try:
    with train._SignalFlag() as signals:  # pylint: disable=protected-access
      trainer = train._Trainer(  # pylint: disable=protected-access
          stage="student", objective=objective, num_epochs=args.epochs,
          config=config, data=data, mesh=mesh, workdir=workdir,
          signals=signals)
      teacher_model, teacher = None, None
      if objective.uses_teacher and objective.teacher_mode == "online":
        teacher_model = trainer.eval_model
        teacher = step_lib.Teacher(variables=jax.jit(
            lambda: trainer.eval_model.init(
                jax.random.key(7), np.zeros((1,) + data.image_shape,
                                            np.float32), train=False),
            out_shardings=banks.replicated(mesh))())
      elif objective.uses_teacher:
        rng = np.random.default_rng(7)
        teacher = step_lib.Teacher(logits=banks.put_sharded(
            (3.0 * rng.standard_normal(
                (data.layout.num_rows, data.num_classes))).astype(
                    config.bank_dtype), mesh))

      # Timestamps from wrappers around the trainer instance's methods.
      events = {"end_epoch": [], "flush": [], "save": []}

      def timed_method(name, fn):
        def wrapper(*a, **k):
          start = time.perf_counter()
          result = fn(*a, **k)
          end = time.perf_counter()
          events[name].append((start, end, counter.count))
          return result
        return wrapper

      trainer._end_epoch = timed_method("end_epoch", trainer._end_epoch)  # pylint: disable=protected-access
      trainer._flush = timed_method("flush", trainer._flush)  # pylint: disable=protected-access
      make_checkpoints = trainer.checkpoints

      def checkpoints():
        ckpts = make_checkpoints()
        ckpts.save = timed_method("save", ckpts.save)
        return ckpts

      trainer.checkpoints = checkpoints

      # The same step, alone: built exactly as _Trainer.run builds it, from
      # the trainer's StepConfig, model and initial carry. It is timed before
      # and after the loop, so that drifting load biases neither side.
      step_fn = step_lib.make_train_step(
          mesh, trainer.step_config(), model=trainer.model,
          discriminator=trainer.discriminator,
          learning_rate=trainer.learning_rate, teacher_model=teacher_model)
      state = {"carry": trainer.initial_carry()}
      step_data = step_lib.StepData(
          images=data.train_images, labels=data.train_labels,
          epoch_order=banks.put_sharded(
              banks.epoch_order(data.layout, trainer.seed, 0), mesh),
          teacher=teacher)
      spe = trainer.steps_per_epoch

      def run_steps(k):
        metrics = None
        for _ in range(k):
          state["carry"], metrics = step_fn(state["carry"], step_data)
        return state["carry"], metrics

      jax.block_until_ready(run_steps(1))  # compiles
      steps_before = counter.count
      half = max(1, args.repeats // 2)
      epoch_runs = common.timed_runs(lambda: run_steps(spe), 0, half)

      compiles_before = counter.count
      loop_start = time.perf_counter()
      carry = trainer.run(teacher, teacher_model)
      loop_end = time.perf_counter()
      loop_compiles = counter.count - compiles_before

      epoch_runs += common.timed_runs(lambda: run_steps(spe), 0,
                                      max(1, args.repeats - half))
      steps_alone = statistics.median(epoch_runs)
      steps_compiles = counter.count - steps_before - loop_compiles

      # Steady epochs: k = 2 .. E-1 (epoch 1's window holds the first
      # checkpoint save, epoch 0 the compilations); with E = 2, epoch 1.
      ends = [e[1] for e in events["end_epoch"]]
      counts = [e[2] for e in events["end_epoch"]]
      steady = list(range(2, args.epochs)) or [1]
      windows = []
      for k in steady:
        lo, hi = ends[k - 1], ends[k]
        within = lambda name: [e for e in events[name] if lo <= e[0] < hi]
        windows.append({
            "epoch": k,
            "seconds": hi - lo,
            "eval_s": sum(e[1] - e[0] for e in within("end_epoch")),
            "flush_s": sum(e[1] - e[0] for e in within("flush")),
            "flushes": len(within("flush")),
            "checkpoint_save_call_s": sum(e[1] - e[0]
                                          for e in within("save")),
            "compiles": counts[k] - counts[k - 1],
        })
      median_of = lambda key: statistics.median(w[key] for w in windows)
      loop_epoch = median_of("seconds")
      eval_s, flush_s = median_of("eval_s"), median_of("flush_s")
      save_s = median_of("checkpoint_save_call_s")
      window_compiles = sum(w["compiles"] for w in windows)
      flushes = windows[-1]["flushes"]
      first_epoch = ends[0] - loop_start
      tail = loop_end - ends[-1]

      # Evaluation throughput: the trainer's predict fn over the test split.
      predict = trainer.predict_fn()
      variables = carry.student.variables
      start = time.perf_counter()
      jax.block_until_ready(predict(variables, data.test_images))
      eval_first = time.perf_counter() - start
      eval_s_call = common.timed(lambda: predict(variables, data.test_images),
                                 1, args.repeats)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)

  ratio = loop_epoch / steps_alone
  num_test = len(data.test_labels)
  figures = {
      "steps_per_epoch": spe,
      "flushes_per_epoch": flushes,
      "loop_total_s": loop_end - loop_start,
      "first_epoch_s": first_epoch,
      "loop_epoch_s": loop_epoch,
      "loop_epoch_windows": windows,
      "loop_epoch_eval_s": eval_s,
      "loop_epoch_flush_s": flush_s,
      "loop_epoch_checkpoint_save_call_s": save_s,
      "loop_epoch_compiles": window_compiles,
      "loop_compiles_total": loop_compiles,
      "tail_after_last_eval_s": tail,
      "steps_alone_epoch_s": steps_alone,
      "steps_alone_epoch_runs_s": epoch_runs,
      "steps_alone_compiles_after_first": steps_compiles,
      "step_s_alone": steps_alone / spe,
      "loop_over_steps_ratio": ratio,
      "loop_minus_eval_over_steps_ratio": (loop_epoch - eval_s) / steps_alone,
      "eval_images": num_test,
      "eval_first_call_s": eval_first,
      "eval_s": eval_s_call,
      "eval_images_per_s": num_test / eval_s_call,
  }
  report["figures"] = figures
  print(f"steps per epoch: {spe} (batch {args.batch_size}); metric fetches "
        f"in the timed epoch: {figures['flushes_per_epoch']}")
  print(f"first epoch (initial state, compilation, steps, eval, first "
        f"checkpoint): {first_epoch:.2f} s")
  window_epochs = ",".join(str(w["epoch"]) for w in windows)
  window_times = ", ".join(f"{w['seconds']:.3f}" for w in windows)
  print(f"loop epoch (median over epochs {window_epochs} of "
        f"0..{args.epochs - 1}: {window_times} s; "
        f"each = checkpoint save of the previous epoch + {spe} steps + metric "
        f"fetches + eval): {loop_epoch:.3f} s; of which eval {eval_s:.3f} s, "
        f"in metric "
        f"fetches {flush_s:.3f} s (mostly waiting for the device), in "
        f"checkpoint save() calls {save_s:.3f} s; compilations in it: "
        f"{window_compiles}")
  alone_times = ", ".join(f"{t:.3f}" for t in epoch_runs)
  print(f"steps alone ({spe} consecutive steps, blocked at the end, median "
        f"of {len(epoch_runs)} runs, before and after the loop: "
        f"{alone_times} s): {steps_alone:.3f} s "
        f"({1e3 * steps_alone / spe:.2f} ms/step, "
        f"{args.batch_size * spe / steps_alone:.1f} images/s); "
        f"recompilations: {steps_compiles}")
  print(f"tail after the last eval (final checkpoint save + wait, results "
        f"file): {tail:.2f} s")
  print(f"loop/steps time ratio: {ratio:.2f}")
  print(f"  (loop minus eval)/steps time ratio: "
        f"{figures['loop_minus_eval_over_steps_ratio']:.2f}")
  print(f"eval throughput: {num_test / eval_s_call:.1f} images/s "
        f"(predict fn over {num_test} test images, eval batch "
        f"{args.eval_batch_size}, {1e3 * eval_s_call:.1f} ms per pass; first "
        f"call {eval_first:.2f} s)")
  common.write_json(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
