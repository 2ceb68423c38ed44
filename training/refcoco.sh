#!/usr/bin/env bash
# The full RefCOCO recipe: import -> train -> evaluate on the test splits.
#
#   bash training/refcoco.sh [seed|grounder|fusion|adapter|fusion-multi|tiny] [COCO_TRAIN2014_DIR]
#
# Without COCO_TRAIN2014_DIR only the needed COCO images are fetched through FiftyOne's zoo.
# Environment:
#   NPROC=8            train on 8 GPUs with torchrun (no code change)
#   REFCOCO_NAME=N     refcoco (default: RefCOCO, tested on testA, testB) or refcocox (RefCOCO +
#                      RefCOCO+ + RefCOCOg, train minus every val/test image; recipe
#                      training/refcocox_<preset>.json, tested on each source's test splits) or
#                      grefcoco (phrases of no, one or several objects: fusion-multi, tiny-fusion-multi;
#                      tested on val, testA, testB with the GREC metrics too)
#   REFCOCO_SOURCE=P   annotations saved with datasets' save_to_disk, or REFER folders (for
#                      refcocox: a folder holding refcoco/, refcoco+/, refcocog/), else the Hub
#   REFCOCO_DATASET=D  FiftyOne dataset name (default: the name)
# Checkpoints, metrics and curves go to runs/NAME-PRESET/ under the current folder.
# `tiny` is a CPU smoke recipe (random encoders, 1 epoch) that checks the pipeline end to end.
set -euo pipefail
PRESET="${1:-seed}"
IMAGES="${2:-}"
NPROC="${NPROC:-1}"
NAME="${REFCOCO_NAME:-refcoco}"
DATASET="${REFCOCO_DATASET:-$NAME}"
HERE="$(cd "$(dirname "$0")" && pwd)"
RECIPE="$HERE/${NAME}_${PRESET//-/_}.json"  # fusion-multi: grefcoco_fusion_multi.json
[ -f "$RECIPE" ] || { echo "No recipe $RECIPE (recipes: $(cd "$HERE" && ls ./*.json | tr '\n' ' '))" >&2; exit 2; }
case "$NAME" in
  refcoco) TEST_SPLITS=(testA testB) ;;
  refcocox) TEST_SPLITS=(refcoco/testA refcoco/testB refcoco+/testA refcoco+/testB refcocog/test) ;;
  grefcoco) TEST_SPLITS=(val testA testB) ;;
  *) echo "REFCOCO_NAME must be refcoco, refcocox or grefcoco, not $NAME" >&2; exit 2 ;;
esac

IMPORT_ARGS=("$NAME" --dataset-name "$DATASET")
[ -n "$IMAGES" ] && IMPORT_ARGS+=(--images-dir "$IMAGES")
[ -n "${REFCOCO_SOURCE:-}" ] && IMPORT_ARGS+=(--source "$REFCOCO_SOURCE")
fiftyone-grounding import-refcoco "${IMPORT_ARGS[@]}"

if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc_per_node "$NPROC" -m fiftyone_grounding.cli train --dataset "$DATASET" --recipe "$RECIPE"
else
  fiftyone-grounding train --dataset "$DATASET" --recipe "$RECIPE"
fi

RUN="runs/${NAME}-${PRESET}"
# evaluate --checkpoint applies the checkpoint first (one model load for all test splits)
fiftyone-grounding evaluate --dataset "$DATASET" --split "${TEST_SPLITS[@]}" --checkpoint "$RUN/best" \
  --label-field "pred_${PRESET}" --json "$RUN/test_metrics.json"
