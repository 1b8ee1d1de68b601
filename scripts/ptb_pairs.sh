#!/usr/bin/env bash
# Train every (update rule, feature map) pair of the paper's fast weight layer (model=fwm) on PTB for a short CPU budget and
# collect the valid/test perplexities in <sweep dir>/summary.md (docs/fast_weights.md shows a run of it).
# Usage: scripts/ptb_pairs.sh [STEPS] [SWEEP_DIR] [extra overrides...]
set -euo pipefail
steps=${1:-600}
sweep_dir=${2:-multirun/ptb_pairs}
shift $(( $# > 2 ? 2 : $# ))
lmtool-train -m model=fwm update_rule=sum,delta feature_map=elu,favor,dpfp \
  trainer.max_steps="$steps" trainer.eval_interval="$steps" trainer.progress=false \
  hydra.sweep.dir="$sweep_dir" "$@"
cat "$sweep_dir/summary.md"
