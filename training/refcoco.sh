#!/usr/bin/env bash
# The full RefCOCO recipe: import -> train -> evaluate on testA and testB.
#   bash training/refcoco.sh [seed|grounder] [COCO_TRAIN2014_DIR]
# More GPUs: NPROC=4 bash training/refcoco.sh   (torchrun; no code change)
set -euo pipefail
PRESET="${1:-seed}"
IMAGES="${2:-}"
NPROC="${NPROC:-1}"
HERE="$(cd "$(dirname "$0")" && pwd)"

if [ -n "$IMAGES" ]; then
  fiftyone-grounding import-refcoco refcoco --images-dir "$IMAGES"
else
  fiftyone-grounding import-refcoco refcoco   # fetches only the needed COCO images via the zoo
fi

if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc_per_node "$NPROC" -m fiftyone_grounding.cli train --dataset refcoco \
    --recipe "$HERE/refcoco_${PRESET}.json"
else
  fiftyone-grounding train --dataset refcoco --recipe "$HERE/refcoco_${PRESET}.json"
fi

for SPLIT in testA testB; do
  fiftyone-grounding evaluate --dataset refcoco --split "$SPLIT" \
    --checkpoint "runs/refcoco-${PRESET}/best" --label-field "pred_${PRESET}"
done
fiftyone-grounding evaluate --dataset refcoco --label-field "pred_${PRESET}" \
  --json "runs/refcoco-${PRESET}/test_metrics.json"
