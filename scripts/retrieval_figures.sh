#!/usr/bin/env bash
# The two synthetic retrieval sweeps of docs/retrieval.md, one after the other (each runs two jobs at a time,
# one CPU thread each), writing retrieval_{capacity,update}.{csv,png} to OUT_DIR (default docs/retrieval).
# Usage: scripts/retrieval_figures.sh [OUT_DIR] [extra lmtool-retrieval overrides, e.g. grid=paper]
set -euo pipefail
out_dir=${1:-docs/retrieval}
shift $(( $# > 0 ? 1 : 0 ))
for setting in capacity update; do
  /usr/bin/time -f "$setting sweep: %e s wall" lmtool-retrieval setting="$setting" out_dir="$out_dir" "$@"
done
