#!/usr/bin/env bash
# The full RefCOCO recipe: import -> train -> evaluate on testA, testB and all splits.
#
#   bash training/refcoco.sh [seed|grounder|tiny] [COCO_TRAIN2014_DIR]
#
# Without COCO_TRAIN2014_DIR only the needed COCO images are fetched through FiftyOne's zoo.
# Environment:
#   NPROC=8            train on 8 GPUs with torchrun (no code change)
#   REFCOCO_SOURCE=P   annotations saved with datasets' save_to_disk (offline), else the Hub
#   REFCOCO_DATASET=N  FiftyOne dataset name (default: refcoco)
# Checkpoints, metrics and curves go to runs/refcoco-PRESET/ under the current folder.
# `tiny` is a CPU smoke recipe (random encoders, 1 epoch) that checks the pipeline end to end.
set -euo pipefail
PRESET="${1:-seed}"
IMAGES="${2:-}"
NPROC="${NPROC:-1}"
DATASET="${REFCOCO_DATASET:-refcoco}"
HERE="$(cd "$(dirname "$0")" && pwd)"
RECIPE="$HERE/refcoco_${PRESET}.json"
[ -f "$RECIPE" ] || { echo "No recipe $RECIPE (choose seed, grounder or tiny)" >&2; exit 2; }

IMPORT_ARGS=(refcoco --dataset-name "$DATASET")
[ -n "$IMAGES" ] && IMPORT_ARGS+=(--images-dir "$IMAGES")
[ -n "${REFCOCO_SOURCE:-}" ] && IMPORT_ARGS+=(--source "$REFCOCO_SOURCE")
fiftyone-grounding import-refcoco "${IMPORT_ARGS[@]}"

if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc_per_node "$NPROC" -m fiftyone_grounding.cli train --dataset "$DATASET" --recipe "$RECIPE"
else
  fiftyone-grounding train --dataset "$DATASET" --recipe "$RECIPE"
fi

RUN="runs/refcoco-${PRESET}"
# evaluate --checkpoint applies the checkpoint first (one model load for both splits)
fiftyone-grounding evaluate --dataset "$DATASET" --split testA testB --checkpoint "$RUN/best" \
  --label-field "pred_${PRESET}" --json "$RUN/test_metrics.json"
