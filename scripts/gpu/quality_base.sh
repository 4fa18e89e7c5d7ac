#!/usr/bin/env bash
# Trains the quality benchmark's base model on a GPU: a `--features cuda`
# build of the bench binary (`cargo bench --bench quality --features cuda
# --no-run` prints its path), bounded by wall-clock minutes instead of steps,
# with large batches (the tiny model is launch-bound one sequence at a time).
# The model lands in OUT/model with the log in OUT/base.log; the rest of the
# benchmark then runs on the CPU with `--reuse-base`.
#   QUALITY=path/to/quality scripts/gpu/quality_base.sh OUT MINUTES [bench flags...]
set -euo pipefail
out=$1 minutes=$2
shift 2
mkdir -p "$out"
"${QUALITY:?the bench binary}" --out "$out" --base-only --device cuda --base-minutes "$minutes" \
    --base-steps 1000000 --base-tokens-per-step 8192 "$@" 2>&1 | tee -a "$out/base.log"
