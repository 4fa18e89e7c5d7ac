#!/usr/bin/env bash
# Compress speed on a GPU (issue 32), on a CUDA build: a random model of
# Llama-3.2-1B's shape in bf16 and a document of 7,813 tokens. First the
# reference (scripts/gpu/torch_prefill.py: one transformers prefill and the
# GPU's bf16 matmul roofline), then every compressor's `sac compress`
# summary line, rounds alternated, then `full` without zstd and with
# 2,048-token chunks, then `sac ask` to the first token from the `full` and
# a ratio-4 `uniform` .sack (whole process and the model's own time).
# Needs python3 with torch, transformers and safetensors.
#   SAC=path/to/sac scripts/gpu/speed.sh [ROUNDS]
set -uo pipefail
S=${SAC:-$PWD/target/release/sac}
ROUNDS=${1:-3}
export SAC_CACHE_DIR=${SAC_CACHE_DIR:-/tmp/sac-gpu-cache} HF_HUB_OFFLINE=1
T=$(mktemp -d)
python3 scripts/gpu/make_1b.py "$T/m1b" > /dev/null
for i in 1 2 3 4 5 6; do cat tests/fixtures/sac/doc_long.txt; done > "$T/long.txt"
python3 scripts/gpu/torch_prefill.py "$T/m1b" "$T/long.txt"

compress() { # NAME ARGS...: one run, its summary line
  local name=$1; shift
  echo "$name: $("$S" compress "$T/long.txt" -o "$T/$name.sack" -m "$T/m1b" --device cuda "$@" 2>&1 | tail -1)"
}
compress warm-up --compressor full > /dev/null
for round in $(seq "$ROUNDS"); do
  for c in full uniform snapkv kvzip; do compress "$c" --compressor "$c"; done
done
compress full-raw --compressor full --zstd-level 0
compress full-2048 --compressor full --chunk-size 2048

for sack in full uniform; do
  for i in 1 2 3; do
    start=$(date +%s.%N)
    ttft=$("$S" ask "$T/$sack.sack" 'What is the first word?' --json --max-tokens 1 --device cuda |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["ttft_ms"])')
    echo "ask $sack: whole process $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s, ttft $ttft ms"
  done
done
ls -l "$T"/*.sack | awk '{print $5, $9}'
rm -rf "$T"
