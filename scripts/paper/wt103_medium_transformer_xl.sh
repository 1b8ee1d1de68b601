#!/usr/bin/env bash
# WikiText-103, medium setting: Transformer-XL: relative positions + segment memory.
# Trains conf/experiment/wt103_medium_transformer_xl.yaml, then scores valid and test as the paper did (segment
# evaluation). Reproduces arXiv 2102.11174, WikiText-103 results, medium setting, row "Transformer-XL" (paper
# numbers: scripts/paper/README.md).
#
# Usage: bash scripts/paper/wt103_medium_transformer_xl.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_medium_transformer_xl.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_medium_transformer_xl}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=segment tgt_len=384 mem_len=384 clamp_len=384 batch_size=1"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_medium_transformer_xl hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
