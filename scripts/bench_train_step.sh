#!/usr/bin/env bash
# Peak memory and time of one `sac train` step on the CPU for a random-weight
# model of Llama-3.2-1B's shape: LoRA rank 128, one 510-token chunk at ratio
# 5, a 256-token continuation, f32. Prints one JSON line (peak_rss_gib is
# VmHWM, the model's 4.6 GiB of weights included).
#   scripts/bench_train_step.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
export RAYON_NUM_THREADS="$threads"
cargo bench --quiet --bench train_step -- --tokens 510 --continuation 256 --rank 128 --ratio 5 --device cpu --dtype f32
