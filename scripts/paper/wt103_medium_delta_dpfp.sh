#!/usr/bin/env bash
# WikiText-103, medium setting: delta update rule + DPFP with nu = 2.
# Trains conf/experiment/wt103_medium_delta_dpfp.yaml, then scores valid and test as the paper did (sliding
# evaluation). Reproduces arXiv 2102.11174, WikiText-103 results, medium setting, row update "delta", attention
# "DPFP" (paper numbers: scripts/paper/README.md).
#
# Usage: bash scripts/paper/wt103_medium_delta_dpfp.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_medium_delta_dpfp.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_medium_delta_dpfp}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=sliding tgt_len=384 batch_size=64"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_medium_delta_dpfp hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
