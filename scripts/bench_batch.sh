#!/usr/bin/env bash
# Times 100 questions answered by one `sac ask FILE --batch questions.txt`
# against the same 100 questions asked by 100 separate `sac ask FILE "q"`
# runs (each of which loads the model and the .sack again), with a release
# build, on a .sack of tests/fixtures/sac/doc_long.txt made with the tiny
# qwen2 fixture model.
#
#   scripts/bench_batch.sh [N_QUESTIONS] [MAX_TOKENS]      (defaults: 100, 16)
#
# Prints both wall times and their ratio. Environment: CARGO_FLAGS (extra
# flags for `cargo build --release`, e.g. "--features mkl"); RAYON_NUM_THREADS
# is passed on to sac (sac sets it itself when unset, since candle 0.11 would
# otherwise read /proc/cpuinfo on every CPU matmul). With a model this small
# the numbers mostly measure fixed costs.
set -euo pipefail

n=${1:-100}
max_tokens=${2:-16}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# shellcheck disable=SC2086
cargo build --release --quiet ${CARGO_FLAGS:-}
sac="$root/target/release/sac"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SAC_CACHE_DIR="$work/cache" HF_HUB_OFFLINE=1
unset SAC_MODEL

# Absolute model path: the .sack header names the model it was made with.
"$sac" compress tests/fixtures/sac/doc_long.txt -o "$work/doc.sack" \
    -m "$root/tests/fixtures/parity/qwen2" --compressor uniform -q

subjects=(report author budget plan meeting result method data model city)
asks=("What does the document say about the" "Who is responsible for the"
    "When was the" "Why did they change the" "How large is the"
    "Where is the" "Summarise the" "What happened to the"
    "Which team owns the" "Is there a problem with the")
for ((i = 0; i < n; i++)); do
    echo "${asks[i % 10]} ${subjects[(i / 10) % 10]} (question $((i + 1)))?"
done >"$work/questions.txt"

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }

# One warm-up run so both sides start with the binary and files in the page cache.
"$sac" ask "$work/doc.sack" "warm-up?" --max-tokens "$max_tokens" >/dev/null

start=$(now)
while IFS= read -r question; do
    "$sac" ask "$work/doc.sack" "$question" --max-tokens "$max_tokens" >>"$work/separate.txt"
done <"$work/questions.txt"
separate=$(calc "$(now) - $start")

start=$(now)
"$sac" ask "$work/doc.sack" --batch "$work/questions.txt" --max-tokens "$max_tokens" \
    >"$work/batch.jsonl"
batch=$(calc "$(now) - $start")

answered=$(wc -l <"$work/batch.jsonl")
if [ "$answered" -ne "$n" ]; then
    echo "bench_batch: the batch answered $answered of $n questions" >&2
    exit 1
fi

printf '%d questions, --max-tokens %d, qwen2 fixture model, RAYON_NUM_THREADS=%s, %s\n' \
    "$n" "$max_tokens" "${RAYON_NUM_THREADS:-unset}" \
    "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
printf '%d separate runs: %8.3f s  (%.1f ms per question)\n' \
    "$n" "$separate" "$(calc "$separate * 1000 / $n")"
printf 'one --batch run:  %8.3f s  (%.1f ms per question)\n' \
    "$batch" "$(calc "$batch * 1000 / $n")"
printf 'ratio separate / batch: %.1fx\n' "$(calc "$separate / $batch")"
