#!/usr/bin/env bash
# The prepared GPU run of the speed and memory benchmarks: one command, about 10-12 minutes on one H100/H200,
# no network. Full-size configs with random weights, generated JPEGs.
#
#   bash benchmarks/run_gpu.sh            # JSONs + logs into "$OUT" if set, else benchmarks/results/
#
# Uses the repository's code (PYTHONPATH=.) and the machine's python3 (PYTHON=... to change).
# FiftyOne: used if importable. A machine without it (and without network) can get it from an
# offline bundle (`.fobundle/setup.sh`, built by `bash tools/offline_fiftyone/build.sh`: wheels, a mongod
# binary and its libraries; not in git): it is sourced when present, which installs FiftyOne into /tmp
# and starts a local mongod.
#
# In the order of what is still to be measured, so that a run cut short (a device session's
# time runs out) still has it; every step writes its log and JSON into $OUT as it ends:
# 0. recipe_step.py: one training step of each real-size recipe of training/ (grounder, fusion,
#    adapter, fusion-multi) at its batch size, bf16: time and torch.cuda.max_memory_allocated.
# 1. apply_throughput.py: `apply_grounding_model` and FiftyOne's `apply_model` end to end vs a
#    per-sample loop (FiftyOne); without FiftyOne, the model alone. Then `apply_grounding_model`
#    once more with 8 DataLoader processes instead of 8 threads (which kind of worker is
#    faster here?) and once with 16 decoding threads (does decoding bound it?).
# 2. tests/test_cuda.py: batches in flight on the GPU give the CPU's boxes.
# 3. train_throughput.py: the training step, seed-style vs grouped vs cached vs cached text,
#    seed preset, 224 px, batch 256, in one run (2 interleaved repeats, medians), then a
#    torch.profiler table of the cached_text step.
# 4. fit_throughput.py: the real `fit` end to end (FiftyOne dataset of 4,000 images x 7
#    expressions, cache build, DataLoader workers, 4 epochs). Needs FiftyOne.
# 5. scale.py: `apply` of 100,000 phrases in 1 process and under torchrun with one rank per GPU
#    found (`apply --distributed`, each rank on cuda:LOCAL_RANK). Needs FiftyOne.
# DEVICE, PRESET, STEPS, FIT_IMAGES, APPLY_IMAGES override the defaults
# (a dry run on a CPU: DEVICE=cpu PRESET=tiny STEPS=2 FIT_IMAGES=40 APPLY_IMAGES=10).
set -u -o pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-seed}"
STEPS="${STEPS:-15}"
FIT_IMAGES="${FIT_IMAGES:-4000}"
APPLY_IMAGES="${APPLY_IMAGES:-1000}"
REPEATS="${REPEATS:-2}"
WORKERS="${WORKERS:-12}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FIFTYONE_DO_NOT_TRACK=true FIFTYONE_DATABASE_VALIDATION=false PYTHONUNBUFFERED=1
export FIFTYONE_GROUNDING_HOME="${FIFTYONE_GROUNDING_HOME:-$(mktemp -d)}"

echo "== machine ($(date -u '+%Y-%m-%d %H:%M UTC'))"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
if ! "$PY" -c "import fiftyone" 2>/dev/null && [ -f .fobundle/setup.sh ]; then
    echo "== FiftyOne from the offline bundle"
    FOBUNDLE_PYTHON="$PY" source .fobundle/setup.sh || echo "(the FiftyOne bundle failed: FiftyOne parts will be skipped)"
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "accelerate", "safetensors", "numpy", "PIL", "torchvision", "fiftyone"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<14}", getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"{name:<14} MISSING ({type(e).__name__})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, "|", p.name, f"{p.total_memory / 2**30:.0f} GiB,", p.multi_processor_count, "SMs,",
          "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
else:
    print("torch sees no CUDA device")
EOF
HAVE_FO=0
"$PY" -c "import fiftyone as fo; fo.list_datasets()" >/dev/null 2>&1 && HAVE_FO=1

status=0
echo
echo "== 0/5 one training step of each real-size recipe at its batch size: time and peak GPU memory"
timeout 240 "$PY" benchmarks/recipe_step.py --device "$DEVICE" --steps 5 --warmup 2 \
    --json "$OUT_DIR/recipe_step.json" 2>&1 | tee "$OUT_DIR/recipe_step.log" || status=1

echo
echo "== 1/5 apply end to end ($PRESET, $APPLY_IMAGES images x 7, batch 256, default workers: 8 threads)"
timeout 170 "$PY" benchmarks/apply_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-sizes 256 \
    --images "$APPLY_IMAGES" --loop-samples 210 --profile \
    --json "$OUT_DIR/apply_${PRESET}.json" 2>&1 | tee "$OUT_DIR/apply.log" || status=1

# apply_grounding_model alone with other workers: apply_variant NAME TITLE WORKER-FLAGS...
apply_variant() {
    local name=$1 title=$2
    shift 2
    echo
    echo "== $title"
    timeout 90 "$PY" benchmarks/apply_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-sizes 256 \
        --images "$APPLY_IMAGES" --loop-samples 30 --repeats 2 --no-fo-apply "$@" \
        --json "$OUT_DIR/apply_${PRESET}_${name}.json" 2>&1 | tee "$OUT_DIR/apply_${name}.log" || status=1
}
apply_variant p8 "1b apply with 8 DataLoader processes instead of threads" --workers 8 --worker-type process
apply_variant w16 "1c apply with 16 decoding threads: is the default (8) bound by JPEG decoding?" --workers 16

echo
echo "== 2/5 tests/test_cuda.py: what only a GPU runs, against the CPU"
if "$PY" -c "import pytest, fiftyone" 2>/dev/null; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT_DIR/test_cuda.log" || status=1
else
    echo "SKIPPED: pytest or FiftyOne is not available here"
fi

echo
echo "== 3/5 training step ($PRESET, 224 px, batch 256, $STEPS timed steps per mode, $REPEATS interleaved repeats)"
timeout 200 "$PY" benchmarks/train_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-size 256 \
    --phrases-per-image 7 --steps "$STEPS" --warmup 5 --modes seed,grouped,cached,cached_text \
    --repeats "$REPEATS" --profile cached_text --json "$OUT_DIR/train_${PRESET}_b256.json" 2>&1 | tee "$OUT_DIR/train.log" || status=1

echo
echo "== 4/5 fit end to end ($PRESET, $FIT_IMAGES images x 7, batch 256, 4 epochs, $WORKERS workers)"
if [ "$HAVE_FO" = 1 ]; then
    timeout 200 "$PY" benchmarks/fit_throughput.py --preset "$PRESET" --device "$DEVICE" --images "$FIT_IMAGES" \
        --batch-size 256 --epochs 4 --workers "$WORKERS" \
        --json "$OUT_DIR/fit_${PRESET}.json" 2>&1 | tee "$OUT_DIR/fit.log" || status=1
else
    echo "SKIPPED: FiftyOne is not available here"
fi

echo
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
echo "== 5/5 distributed apply on the $NGPU GPU(s) found: torchrun, one rank per GPU, against 1 process (tiny, 100,000 phrases)"
if [ "$HAVE_FO" = 1 ] && [ "${NGPU:-0}" -ge 1 ]; then
    timeout 420 "$PY" benchmarks/scale.py --sizes 100000 --stages apply apply_2proc --device "$DEVICE" \
        --procs "$NGPU" --threads 4 --json "$OUT_DIR/scale_apply_${NGPU}gpu.json" 2>&1 | tee "$OUT_DIR/scale_apply.log" || status=1
else
    echo "SKIPPED: needs FiftyOne and at least one GPU"
fi

echo
echo "== done (status $status); results in $OUT_DIR"
ls -l "$OUT_DIR"
[ -f .fobundle/setup.sh ] && [ "$HAVE_FO" = 1 ] && source .fobundle/setup.sh stop >/dev/null 2>&1
exit $status
