#!/usr/bin/env bash
# One PTB benchmark of every model family at the default run's size and budget (docs/benchmarks.md).
# Two Hydra sweeps into SWEEP_DIR: the 2021 models (arXiv 2102.11174) with two seeds, the later families with one.
# Running the same command again resumes: finished jobs only redo their final evaluation, interrupted ones
# continue from their last checkpoint. Then SWEEP_DIR/benchmark.md (the table) and benchmark.png (valid curves).
#
# Usage: scripts/ptb_benchmark.sh [SWEEP_DIR] [all|2021|later] [extra lmtool-train overrides...]
#   scripts/ptb_benchmark.sh runs/ptb_benchmark                       # everything, one job after another
#   scripts/ptb_benchmark.sh runs/ptb_benchmark 2021 trainer.num_threads=1 &   # two halves side by side,
#   scripts/ptb_benchmark.sh runs/ptb_benchmark later trainer.num_threads=1    # one thread each
# MODELS_2021, MODELS_LATER (comma-separated experiment names) and SEEDS_2021 replace the lists below.
set -euo pipefail
sweep_dir=${1:-runs/ptb_benchmark}
part=${2:-all}
shift $(( $# > 2 ? 2 : $# ))
MODELS_2021=${MODELS_2021:-ptb_transformer,ptb_transformer_xl,ptb_linear_transformer,ptb_performer,ptb_delta_network,ptb_delta_favor,ptb_delta_dpfp}
MODELS_LATER=${MODELS_LATER:-ptb_default,ptb_deltanet,ptb_gated_deltanet,ptb_delta_product,ptb_delta_mlp,ptb_delta_delta,ptb_delta_rnn,ptb_delta_lstm,ptb_rec_delta,ptb_srwm,ptb_lstm}
SEEDS_2021=${SEEDS_2021:-1111,1112}

if [[ $part == all || $part == 2021 ]]; then
  lmtool-train -m experiment="$MODELS_2021" seed="$SEEDS_2021" trainer.progress=false \
    hydra.sweep.dir="$sweep_dir/2021" "$@"
fi
if [[ $part == all || $part == later ]]; then
  lmtool-train -m experiment="$MODELS_LATER" trainer.progress=false hydra.sweep.dir="$sweep_dir/later" "$@"
fi
python "$(dirname "$0")/ptb_benchmark_table.py" "$sweep_dir" > "$sweep_dir/benchmark.md"
mkdir -p "$sweep_dir/2021" "$sweep_dir/later"  # a part not run yet is an empty panel, not an error
lmtool-plot "$sweep_dir"/2021 "$sweep_dir"/later --x time --splits valid --out "$sweep_dir/benchmark.png"
cat "$sweep_dir/benchmark.md"
