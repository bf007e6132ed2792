#!/usr/bin/env bash
# One prepared check for a machine with one GPU: tests, then the benchmarks.
#
#   bash benchmarks/gpu_check.sh            # GPU machine: finishes in < 8 min
#   SMOKE=1 bash benchmarks/gpu_check.sh    # any CPU: tiny CNN, small batches
#
# The GPU machine is expected to have JAX (CUDA), Flax, Optax, Orbax, chex,
# ml_collections and PyTorch but no internet: this script installs nothing.
# What is missing is reported (pytest files, torch, ml_collections for the
# JAX benchmarks), never fetched.
#
# Environment:
#   OUT       results go to ${OUT:-benchmarks/results}/ (gpu_check.txt: every
#             printed figure; gpu_check.stderr.txt; one JSON per benchmark)
#   PYTHON    interpreter (default: python3)
#   SMOKE=1   small settings for a CPU smoke test
#   FASHION_MNIST_DIR  a Fashion-MNIST image folder, ROOT/train/<class>/*.png
#             (32x32 RGB; 1,000 per class is 12 MB): when set,
#             a teacher + ce, ps_kd, ai_kd comparison on it runs first, with
#             PreAct ResNet-18 at PS-KD's recipe (FM_EPOCHS epochs, default
#             15), and its table is printed. It runs with several steps per
#             call and checkpoints by time (LOOP_K, LOOP_MINUTES below),
#             in FM_WORKDIR (default ${OUT}/fashion_mnist).
#   BUDGET_S  wall-clock budget for all commands (default 450 s; 900 s with
#             SMOKE); each command has its own cap as well, and a command
#             whose turn comes with under 15 s left is skipped. The budget,
#             not the sum of the caps, keeps the whole call under 8 min:
#             the commands run in order of importance (step throughput
#             with MFU, steps per dispatch, the loop at today's and the
#             proposed settings, real images, start-up, profile, tests),
#             so what a short budget drops is what was measured before
#             (float32, bank copies, the PyTorch comparison) at the end.
# JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default
# /tmp/aikd_jax_compilation_cache) lets a later command reuse an identical
# executable (compare_frameworks' JAX steps are step_throughput's); it only
# shortens "first call" times, never the timed runs.

set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.txt"
ERR="$RESULTS/gpu_check.stderr.txt"
: >"$LOG"
: >"$ERR"
if [ "$SMOKE" = "1" ]; then
  BUDGET=${BUDGET_S:-900}; PYTEST_CAP=200  # the tests compile on 2 slow cores
else
  BUDGET=${BUDGET_S:-450}; PYTEST_CAP=100
fi
START=$(date +%s)
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/aikd_jax_compilation_cache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

say() { echo "$*" | tee -a "$LOG"; }

# run NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout`, its stdout
# into the log, its stderr into the stderr file; says how it ended.
run() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    say "== $name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
    return
  fi
  say ""
  say "== $name (timeout ${limit}s): $*"
  echo "== $name: $*" >>"$ERR"
  local t0
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>>"$ERR" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "== $name: TIMED OUT after ${took}s (figures printed before the cut are above)"
  elif [ "$rc" -ne 0 ]; then
    say "== $name: FAILED (exit $rc) after ${took}s; last stderr lines:"
    tail -n 20 "$ERR" | tee -a "$LOG"
  else
    say "== $name: done in ${took}s"
  fi
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) SMOKE=$SMOKE budget=${BUDGET}s python=$(command -v "$PY")"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
"$PY" - <<'EOF' 2>>"$ERR" | tee -a "$LOG"
import importlib.util
names = ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "torch",
         "pytest", "absl", "ml_collections"]
have = {n: importlib.util.find_spec(n.split(".")[0]) is not None and
        importlib.util.find_spec(n) is not None for n in names}
print("modules: " + ", ".join(f"{n}={'yes' if ok else 'MISSING'}"
                              for n, ok in have.items()))
import jax
print(f"jax {jax.__version__}: backend={jax.default_backend()} "
      f"devices={jax.devices()}")
EOF
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$SMOKE" != "1" ] && [ "$BACKEND" != "gpu" ]; then
  say "warning: JAX sees no GPU (backend=$BACKEND); the full settings will be slow here. Use SMOKE=1 on a CPU."
fi

# The loop at the automatic K on a GPU and the CIFAR presets' save interval
# (on a CPU the loop of K steps is far slower, so the smoke test uses 2).
if [ "$SMOKE" = "1" ]; then LOOP_K=${LOOP_K:-2}; else LOOP_K=${LOOP_K:-16}; fi
LOOP_MINUTES=${LOOP_MINUTES:-10}

if [ "$SMOKE" = "1" ]; then
  MODEL=tiny_cnn
  ST_ARGS=(--model=tiny_cnn --methods=ai_kd --batch_sizes=32,64
           --num_examples=2048 --steps_per_run=3 --warmup=1 --repeats=2)
  F32_ARGS=(--model=tiny_cnn --batch_sizes=32 --num_examples=2048
            --steps_per_run=3 --warmup=1 --repeats=2)
  BANK_ARGS=(--num_examples=8192 --batch_sizes=64)
  LOOP_ARGS=(--model=tiny_cnn --dtype=float32 --batch_size=64
             --num_examples=2048 --num_test=512 --eval_batch_size=256
             --log_every_steps=10 --epochs=4 --repeats=2)
  CMP_ARGS=(--model=tiny_cnn --batch_size=32 --num_examples=1024
            --steps_per_run=3 --warmup=1 --repeats=2)
  DISPATCH_ARGS=(--model=tiny_cnn --batch_sizes=32 --num_examples=1024
                 --steps_per_run=4 --warmup=1 --repeats=2
                 --steps_per_dispatch=1,4,4a)
  PROFILE_ARGS=(--model=tiny_cnn --batch_sizes=32 --num_examples=2048
                --steps=3 --dtype=float32)
  START_ARGS=(--model=tiny_cnn --no_cache_off)
else
  MODEL=preact_resnet18
  # ai_kd at the issue's two ends: the small batch (dispatch) and the large
  # one (MFU); ce's step was within 1% of ai_kd's at every batch before.
  ST_ARGS=(--model=preact_resnet18 --methods=ai_kd --batch_sizes=128,2048
           --num_examples=50000 --steps_per_run=20 --warmup=1 --repeats=5)
  F32_ARGS=(--model=preact_resnet18 --methods=ce,ai_kd --batch_sizes=128
            --num_examples=50000 --steps_per_run=20 --warmup=1 --repeats=5)
  BANK_ARGS=(--num_examples=50000 --batch_sizes=128)
  LOOP_ARGS=(--model=preact_resnet18 --dtype=bfloat16 --batch_size=128
             --num_examples=50000 --num_test=10000 --eval_batch_size=1000
             --log_every_steps=100 --epochs=4 --repeats=4)
  CMP_ARGS=(--model=preact_resnet18 --batch_size=128 --num_examples=50000
            --steps_per_run=10 --warmup=1 --repeats=5)
  DISPATCH_ARGS=(--model=preact_resnet18 --batch_sizes=128
                 --num_examples=50000 --steps_per_run=48 --warmup=1
                 --repeats=5 --steps_per_dispatch=1,8,16,16a)
  PROFILE_ARGS=(--model=preact_resnet18 --batch_sizes=128,2048 --steps=20
                --dtype=bfloat16)
  START_ARGS=(--model=preact_resnet18 --no_cache_off --timeout=100)
fi

# 1. The step: images/s, FLOPs per step, TFLOP/s and MFU (bfloat16).
run step_throughput_bf16 110 "$PY" benchmarks/step_throughput.py \
  "${ST_ARGS[@]}" --dtype=bfloat16 --out="$RESULTS/step_throughput_bf16.json"
# 2. Steps per call of the jitted step (config.steps_per_dispatch): ai_kd
# at batch 128, K = 1, 8, 16 and 16 with the loop's trip count an argument
# (16a: every call as an epoch's shorter last one), interleaved. K = 1 is
# step_throughput's program (a compilation-cache hit); each other entry
# compiles one loop program.
run step_dispatch 120 "$PY" benchmarks/step_throughput.py \
  "${DISPATCH_ARGS[@]}" --methods=ai_kd --dtype=bfloat16 \
  --out="$RESULTS/step_dispatch.json"
# 3. The real epoch loop against its steps: at one step per call with a
# save after every epoch (the settings before), at LOOP_K steps per call
# with the same saves, then with saves every LOOP_MINUTES minutes (each
# evaluation is then read during the next epoch's steps).
run loop_overhead_k1 60 "$PY" benchmarks/loop_overhead.py "${LOOP_ARGS[@]}" \
  --out="$RESULTS/loop_overhead_k1.json"
run loop_overhead_k"$LOOP_K" 60 "$PY" benchmarks/loop_overhead.py \
  "${LOOP_ARGS[@]}" --steps_per_dispatch="$LOOP_K" \
  --out="$RESULTS/loop_overhead_k$LOOP_K.json"
run loop_overhead_k"$LOOP_K"_by_time 60 "$PY" benchmarks/loop_overhead.py \
  "${LOOP_ARGS[@]}" --steps_per_dispatch="$LOOP_K" \
  --checkpoint_every_minutes="$LOOP_MINUTES" \
  --out="$RESULTS/loop_overhead_k${LOOP_K}_by_time.json"

# 4. Real images: a short comparison on the Fashion-MNIST folder.
if [ -n "${FASHION_MNIST_DIR:-}" ]; then
  FM_ARGS=(--config.num_epochs="${FM_EPOCHS:-15}"
           --config.steps_per_dispatch="$LOOP_K"
           --config.checkpoint_every_minutes="$LOOP_MINUTES")
  if [ "$SMOKE" = "1" ]; then
    FM_ARGS+=(--config.num_epochs=2 --config.model=tiny_cnn)
  else
    FM_ARGS+=(--config.compute_dtype=bfloat16)
  fi
  FM_WORKDIR=${FM_WORKDIR:-$RESULTS/fashion_mnist}
  rm -rf "$FM_WORKDIR"
  run fashion_mnist_compare 150 "$PY" -m aikd_jax.compare \
    --config="configs/fashion_mnist.py:$FASHION_MNIST_DIR" "${FM_ARGS[@]}" \
    --methods=ce,ps_kd,ai_kd --seeds=1 --workdir="$FM_WORKDIR"
  if [ -f "$FM_WORKDIR/report/results.md" ]; then
    cat "$FM_WORKDIR/report/results.md" | tee -a "$LOG"
  fi
else
  say "== fashion_mnist_compare: SKIPPED (FASHION_MNIST_DIR is not set)"
fi

# 5. A second start: main.py again with the persistent compilation cache.
run start_time 100 "$PY" benchmarks/start_time.py "${START_ARGS[@]}" \
  --out="$RESULTS/start_time.json"
# 6. What limits the step, from a device trace.
run profile_step 70 "$PY" benchmarks/profile_step.py "${PROFILE_ARGS[@]}" \
  --trace_dir="$RESULTS/traces" \
  --out="$RESULTS/profile_step.json"

# Where the loop's device time goes: one epoch at the settings above, traced
# (its timings are slowed by the trace; the untraced ones are above).
run loop_trace 60 "$PY" benchmarks/loop_overhead.py "${LOOP_ARGS[@]}" \
  --steps_per_dispatch="$LOOP_K" --checkpoint_every_minutes="$LOOP_MINUTES" \
  --trace_dir="$RESULTS/loop_trace" --out="$RESULTS/loop_trace.json"

# 7. Tests on this backend.
TESTS=()
for f in tests/test_steps_per_dispatch.py tests/test_train_step.py \
  tests/test_losses.py tests/test_banks.py; do
  if [ -f "$f" ]; then TESTS+=("$f"); else say "note: $f is missing; not run."; fi
done
if ! "$PY" -c "import pytest" 2>/dev/null; then
  say "== pytest: SKIPPED (pytest is not installed)"
elif [ ${#TESTS[@]} -eq 0 ]; then
  say "== pytest: SKIPPED (none of the test files exists)"
else
  run pytest "$PYTEST_CAP" "$PY" -m pytest -q -p no:cacheprovider \
    -m "not slow" "${TESTS[@]}"
fi

# 8. Measured before; kept for a longer budget.
run step_throughput_f32 75 "$PY" benchmarks/step_throughput.py \
  "${F32_ARGS[@]}" --dtype=float32 --out="$RESULTS/step_throughput_f32.json"
# Whole-bank copies in the compiled step (an in-place bank update has none):
# the tiny CNN compiles fast and its bank update is the same code.
run bank_copies 40 "$PY" benchmarks/step_throughput.py --model=tiny_cnn \
  "${BANK_ARGS[@]}" --methods=ce,ps_kd --steps_per_run=3 --warmup=0 \
  --repeats=2 --check_bank_copies --out="$RESULTS/bank_copies.json"
run compare_frameworks 150 "$PY" benchmarks/compare_frameworks.py \
  "${CMP_ARGS[@]}" --out="$RESULTS/compare_frameworks.json"

say ""
say "== summary ($(($(date +%s) - START))s in all, model $MODEL)"
SUMMARY=$(grep -E "ratio:|speedup|FLOPs per step|bf16 peak|projected|images/s \(|full-bank copies|limit at|^profile:|^loop trace|^loop phases|^start:|second start|resume start|passed|failed|rror|TIMED OUT|FAILED|SKIPPED|skipp|missing|^\| (CE|PS-KD|AI-KD) " "$LOG" | grep -v "^== summary")
say "$SUMMARY"
say ""
say "results: $LOG (all printed figures), $ERR (stderr), JSON: $(ls "$RESULTS"/*.json 2>/dev/null | tr '\n' ' ')"
