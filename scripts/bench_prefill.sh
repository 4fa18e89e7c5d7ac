#!/usr/bin/env bash
# Prefill throughput, ours beside HF transformers, in one run on one machine:
# a 512-token prefill of a random-weight model of Llama-3.2-1B's shape, f32,
# on the CPU, with the same thread count. Needs the venv of
# scripts/requirements-fixtures.txt in .venv.
#   scripts/bench_prefill.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
export RAYON_NUM_THREADS="$threads"
cargo bench --quiet --bench prefill -- --tokens 512 --repeats 3 --device cpu
.venv/bin/python scripts/bench_hf_prefill.py --threads "$threads" --tokens 512 --repeats 3 --logits-to-keep 1
.venv/bin/python scripts/bench_hf_prefill.py --threads "$threads" --tokens 512 --repeats 3
