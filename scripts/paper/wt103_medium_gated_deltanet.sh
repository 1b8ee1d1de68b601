#!/usr/bin/env bash
# WikiText-103, medium setting: Gated DeltaNet (lmtool's own recipe, not in the paper).
# Trains conf/experiment/wt103_medium_gated_deltanet.yaml, then scores valid and test with a sliding window.
#
# Usage: bash scripts/paper/wt103_medium_gated_deltanet.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_medium_gated_deltanet.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_medium_gated_deltanet}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=sliding tgt_len=384 batch_size=64"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_medium_gated_deltanet hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
