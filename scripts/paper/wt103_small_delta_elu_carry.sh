#!/usr/bin/env bash
# WikiText-103, small setting: delta + ELU+1 with the fast weights carried across segments: no positional encoding,
# no attention normalisation (the original toolkit's --carry_over_fast_weight --no_pos).
# Trains conf/experiment/wt103_small_delta_elu_carry.yaml, then scores valid and test as the paper did (carry
# evaluation). Reproduces arXiv 2102.11174, WikiText-103 results, small setting, row delta rule "without truncating
# the context" (paper numbers: scripts/paper/README.md).
#
# Usage: bash scripts/paper/wt103_small_delta_elu_carry.sh [RUN_DIR] [extra lmtool-train overrides ...]
#   Several GPUs (trainer.batch_size is the global batch):
#   TRAIN="torchrun --standalone --nproc_per_node=2 -m lmtool.train" bash scripts/paper/wt103_small_delta_elu_carry.sh
#   Run again with the same RUN_DIR to resume an interrupted training run.
set -euo pipefail
RUN_DIR=${1:-runs/wt103_small_delta_elu_carry}
TRAIN=${TRAIN:-lmtool-train}
EVAL_ARGS="mode=carry tgt_len=256 batch_size=1"

lmtool-prepare dataset=wt103
$TRAIN experiment=wt103_small_delta_elu_carry hydra.run.dir="$RUN_DIR" "${@:2}"
for split in valid test; do
  lmtool-eval checkpoint="$RUN_DIR/checkpoints/best.pt" split=$split $EVAL_ARGS
done
