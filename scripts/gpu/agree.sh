#!/usr/bin/env bash
# On a CUDA build: every training-free compressor on the fixture models, on
# the CPU and on CUDA in f32; the greedy tokens of the two .sack files'
# answers must agree. Prints one line a model and compressor; exits 1 if
# any pair differs or gave no answer.
#   SAC=path/to/sac scripts/gpu/agree.sh
set -uo pipefail
S=${SAC:-$PWD/target/release/sac}
export SAC_CACHE_DIR=${SAC_CACHE_DIR:-/tmp/sac-gpu-cache} HF_HUB_OFFLINE=1
T=$(mktemp -d) failed=0
ask_tokens() { "$S" ask "$1" 'What is the first word?' --json --max-tokens 8 --device "$2" --dtype f32 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])'; }
for m in qwen2 llama3; do
  for c in full uniform kvzip snapkv streaming; do
    for dev in cpu cuda; do
      "$S" compress tests/fixtures/sac/doc_long.txt -o "$T/$m-$c-$dev.sack" -m "tests/fixtures/parity/$m" \
          --compressor "$c" --kv-encoding f32 --device "$dev" --dtype f32 -q
    done
    cpu=$(ask_tokens "$T/$m-$c-cpu.sack" cpu) cuda=$(ask_tokens "$T/$m-$c-cuda.sack" cuda)
    if [ -z "$cpu" ] || [ -z "$cuda" ]; then echo "$m $c: FAILED (no answer)"; failed=1
    elif [ "$cpu" = "$cuda" ]; then echo "$m $c: cpu and cuda agree"
    else echo "$m $c: cpu and cuda DIFFER"; failed=1; fi
  done
done
rm -rf "$T"
exit "$failed"
