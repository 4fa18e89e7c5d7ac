#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, on a CUDA build (`cargo build
# --release --features cuda`): every compressor against the CPU on the
# fixture models (scripts/gpu/agree.sh), then a random model of
# Llama-3.2-1B's shape in bf16 (compress speed: scripts/gpu/speed.sh): 20
# separate asks against a batch of 100, and `sac train` steps (rank 128,
# one 510-token chunk and a 256-token continuation) with the peak GPU
# memory nvidia-smi reports.
# Needs python3 with torch and safetensors (for the random weights).
#   SAC=path/to/sac scripts/gpu/bench.sh
set -uo pipefail
S=${SAC:-$PWD/target/release/sac}
export SAC_CACHE_DIR=${SAC_CACHE_DIR:-/tmp/sac-gpu-cache} HF_HUB_OFFLINE=1
T=$(mktemp -d)
SAC="$S" bash scripts/gpu/agree.sh

python3 scripts/gpu/make_1b.py "$T/m1b"
for i in 1 2 3 4 5 6; do cat tests/fixtures/sac/doc_long.txt; done > "$T/long.txt"
"$S" compress "$T/long.txt" -o "$T/1b-full.sack" -m "$T/m1b" --compressor full --device cuda -q
for i in $(seq 100); do echo "What does the document say about item $i?"; done > "$T/q.txt"
start=$(date +%s.%N)
for i in $(seq 20); do "$S" ask "$T/1b-full.sack" "$(sed -n "${i}p" "$T/q.txt")" --max-tokens 16 --device cuda > /dev/null; done
echo "20 separate asks: $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s"
start=$(date +%s.%N)
"$S" ask "$T/1b-full.sack" --batch "$T/q.txt" --max-tokens 16 --device cuda > "$T/a.jsonl"
echo "one --batch of 100: $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s, $(wc -l < "$T/a.jsonl") answers"

python3 - "$T" <<'PY'
import json, sys
doc = open("tests/fixtures/sac/doc_long.txt").read()
with open(sys.argv[1] + "/pre.jsonl", "w") as f:
    for _ in range(8):
        f.write(json.dumps({"text": (doc + "\n") * 2}) + "\n")
PY
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$T/mem.log" &
smi=$!
"$S" train -m "$T/m1b" --data "$T/pre.jsonl" -o "$T/adapter" --ratio 5 --lora-rank 128 --batch 1 \
    --grad-accum 1 --steps 20 --min-context 510 --max-context 510 --continuation 256 --device cuda -q
kill "$smi"
echo "peak GPU memory used (MiB): $(sort -n "$T/mem.log" | tail -1)"
python3 - "$T" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/adapter/log.jsonl") if "tokens_per_s" in l]
speeds = sorted(r["tokens_per_s"] for r in rows[2:])
print(f"{len(rows)} steps, {rows[-1]['tokens']} tokens a step, median {speeds[len(speeds) // 2]:.0f} tokens/s, "
      f"loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}")
PY
rm -rf "$T"
