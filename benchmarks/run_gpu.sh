#!/usr/bin/env bash
# The prepared GPU run of issue 5 (speed): one command, < 6 minutes on one H100, no network.
#
#   bash benchmarks/run_gpu.sh            # JSONs + logs into "$OUT" if set, else benchmarks/results/
#
# Uses the repository's code (PYTHONPATH=.) and the machine's python3 (PYTHON=... to change).
# 1. train_throughput.py: seed preset (DINOv3 ViT-B/16 + BGE-small configs, random weights),
#    224 px, batch 64, 30 timed steps per mode: seed step vs grouped vs grouped+bf16 vs cached.
# 2. apply_throughput.py: apply_model vs a per-sample loop (batch 64 and 256) when FiftyOne is
#    installed; otherwise (the GPU image has no FiftyOne) the model alone, bf16, batch 64/256
#    vs one expression at a time, with the reason printed.
# DEVICE, PRESET, STEPS override the defaults (e.g. a dry run: DEVICE=cpu PRESET=tiny STEPS=2).
set -u -o pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-seed}"
STEPS="${STEPS:-30}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FIFTYONE_DO_NOT_TRACK=true FIFTYONE_DATABASE_VALIDATION=false
export FIFTYONE_GROUNDING_HOME="${FIFTYONE_GROUNDING_HOME:-$(mktemp -d)}"

echo "== machine ($(date -u '+%Y-%m-%d %H:%M UTC'))"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "accelerate", "safetensors", "numpy", "PIL", "cv2", "albumentations", "fiftyone"):
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

status=0
echo
echo "== 1/2 training throughput ($PRESET, 224 px, batch 64, $STEPS timed steps per mode)"
timeout 200 "$PY" benchmarks/train_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-size 64 \
    --image-size 224 --phrases-per-image 7 --steps "$STEPS" --warmup 5 \
    --json "$OUT_DIR/train_${PRESET}_224_b64.json" 2>&1 | tee "$OUT_DIR/train.log" || status=1

echo
echo "== 2/2 inference throughput ($PRESET, batch 64 and 256)"
timeout 150 "$PY" benchmarks/apply_throughput.py --preset "$PRESET" --device "$DEVICE" --batch-sizes 64,256 \
    --json "$OUT_DIR/apply_${PRESET}.json" 2>&1 | tee "$OUT_DIR/apply.log" || status=1

echo
echo "== done (status $status); results in $OUT_DIR"
ls -l "$OUT_DIR"
exit $status
