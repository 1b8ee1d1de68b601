#!/usr/bin/env bash
# WikiText-103, small setting: self-referential weight matrix ("A Modern Self-Referential Weight Matrix That Learns to Modify Itself", Irie et al. 2022, arXiv 2202.05780) in place of the fast weight layer.
# Trains conf/experiment/wt103_small_srwm.yaml, then scores valid and test with a sliding window as the authors did.
# Not in a paper (lmtool's own setting).
#
# Usage: bash scripts/paper/wt103_small_srwm.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_small_srwm.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_small_srwm}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=sliding tgt_len=256 batch_size=64"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_small_srwm hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
