#!/usr/bin/env bash
# WikiText-103, small setting: Delta LSTM: input gate, update and output gate from delta-rule fast matrices, each with a feed-forward and a recurrent part.
# Trains conf/experiment/wt103_small_delta_lstm.yaml, then scores valid and test with a sliding window as the authors did.
# Reproduces arXiv 2106.06295, Table 2, small, row "Delta LSTM" (the original code's attn_type 254)
# (paper numbers: scripts/paper/README.md).
#
# Usage: bash scripts/paper/wt103_small_delta_lstm.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_small_delta_lstm.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_small_delta_lstm}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=sliding tgt_len=256 batch_size=64"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_small_delta_lstm hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
