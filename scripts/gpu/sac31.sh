#!/usr/bin/env bash
# Issue 31 on a lent GPU: SAC adapters for SmolLM2-135M at ratios 4, 8 and
# 16, side by side on one GPU within a time budget, then their answers to
# the quality benchmark's dev questions (f32, as the CPU table runs them).
#
#   scripts/gpu/sac31.sh SAC MODEL DATA OUT SECONDS
#
# SAC: a `--features cuda` build; MODEL: the SmolLM2 GGUF; DATA: the output
# of scripts/squad_train_data.py; OUT: where the adapters, logs and answers
# go; SECONDS: the wall-clock budget for all of it.
#
# Each ratio, starting from the shipped ratio-4 adapter (an adapter at
# another ratio seeds its anchors from it):
#   1. pretraining on the training articles (pretrain-windows.jsonl) for a
#      fifth of the budget;
#   2. QA on document-length windows (qa-train-doc.jsonl), as many steps as
#      the pretraining's speed says fit in half the budget, judged on
#      qa-held-doc49.jsonl (every 19th of qa-held-doc.jsonl, made if missing)
#      at a third, two thirds and the end; the adapter
#      at half the steps is kept for the dev curve;
#   3. the dev documents (benches/quality/items/dev.jsonl, picked as the
#      bench picks them for --questions 500) compressed with each adapter and
#      asked in one --batch each, into OUT/peers.jsonl, the bench's --peers
#      format.
# RATIOS (default "4 8 16"), PT_STEPS (pretraining's schedule, default 200)
# and DEV_QUESTIONS (default 500) shrink it for a trial run on the CPU.
# SQuAD v1.1 text and questions: CC BY-SA 4.0.
set -uo pipefail
S=$1 M=$2 D=$3 O=$4 BUDGET=$5
RATIOS=${RATIOS:-4 8 16}
mkdir -p "$O"
DEV=$(mktemp -d)
trap 'rm -rf "$DEV"' EXIT
[ -f "$D/qa-held-doc49.jsonl" ] || awk 'NR%19==1' "$D/qa-held-doc.jsonl" > "$D/qa-held-doc49.jsonl"
start=$(date +%s)
# Seconds of the budget left, less $1; at least 1 (`timeout 0` would not stop).
left() { python3 -c "print(max(1, $BUDGET - ($(date +%s) - $start) - $1))"; }

python3 - "$DEV" "${DEV_QUESTIONS:-500}" <<'PY'
import json, sys
out, limit = sys.argv[1], int(sys.argv[2])
docs = [json.loads(l) for l in open("benches/quality/items/dev.jsonl")]
# benches/quality/squad.rs pick(): each article's first document in turn until 500 questions.
by_article = []
for d in docs:
    if by_article and by_article[-1][0]["title"] == d["title"]:
        by_article[-1].append(d)
    else:
        by_article.append([d])
picked, asked = [], 0
for round_ in range(max(map(len, by_article))):
    for queue in by_article:
        if asked < limit and round_ < len(queue):
            asked += len(queue[round_]["questions"])
            picked.append(queue[round_])
written = 0
for i, d in enumerate(picked):
    open(f"{out}/doc{i}.txt", "w").write(d["text"])
    with open(f"{out}/doc{i}.jsonl", "w") as f:
        for q in d["questions"][:limit]:
            f.write(json.dumps({"id": q["id"], "question": q["question"]}) + "\n")
            written += 1
print(f"{len(picked)} dev documents, {written} questions")
PY

# Answers of adapter $1 at ratio $2 to every dev question, as peers rows named
# $3, into a file of their own under $DEV (OUT/peers.jsonl joins them at the end).
dev_answers() {
  local a=$1 r=$2 row=$3 w
  w=$(mktemp -d)
  for t in "$DEV"/doc*.txt; do
    local i=${t%.txt}
    timeout -k 10 "$(left 5)" "$S" compress "$t" -o "$w/d.sack" -m "$M" --prompt raw \
        --compressor sac --adapter "$a" --ratio "$r" --dtype f32 -q &&
      timeout -k 10 "$(left 5)" "$S" ask "$w/d.sack" -m "$M" --batch "$i.jsonl" --max-tokens 32 \
        --stop $'\n' --dtype f32 >> "$w/answers.jsonl"
  done
  python3 - "$w/answers.jsonl" "$row" "$r" > "$(mktemp "$DEV/answers.XXXXXX")" <<'PY'
import json, os, sys
path, row, ratio = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(path).read().splitlines() if os.path.exists(path) else []
for line in lines:
    v = json.loads(line)
    print(json.dumps({"row": row, "layout": "raw", "ratio": ratio, "id": v["id"], "answer": v["answer"]}))
print(f"{row}: {len(lines)} answers", file=sys.stderr)
PY
  rm -rf "$w"
}

# The step of the adapter last saved in a run's log (every save is evaluated).
saved_step() {
  python3 -c '
import json, sys
print(max([json.loads(l)["step"] for l in open(sys.argv[1]) if "eval_f1" in l] or [0]))' "$1"
}

median_speed() {
  python3 -c '
import json, sys
v = sorted(json.loads(l)["tokens_per_s"] for l in open(sys.argv[1]) if "tokens_per_s" in l)
print(int(v[len(v) // 2]) if v else 0)' "$1"
}

ratio_run() {
  local r=$1 w=$O/r$1
  local pt=$((BUDGET / 5)) qa=$((BUDGET / 2))
  timeout -k 20 "$pt" "$S" train -m "$M" --data "$D/pretrain-windows.jsonl" --init assets/sac-smollm2-r4 \
      --ratio "$r" --out "$w/pt" --stage pretrain --lr 1e-4 --grad-accum 8 --steps "${PT_STEPS:-200}" \
      --save-every 5 --seed 1 -q
  local speed steps
  speed=$(median_speed "$w/pt/log.jsonl" 2>/dev/null || echo 0)
  # A QA step: 8 questions of about 1,750 tokens, and evaluations besides.
  steps=$(python3 -c "print(max(6, min(245, int($qa * $speed * 0.7 / (8 * 1750)) // 6 * 6)))")
  echo "ratio $r: pretraining at $speed tokens/s, $(grep -c tokens_per_s "$w/pt/log.jsonl") steps; qa: $steps steps"
  # Pretraining that saved nothing in its time leaves QA to start from the shipped adapter.
  local init=assets/sac-smollm2-r4
  [ -f "$w/pt/adapter_config.json" ] && init=$w/pt
  local qa_args=(-m "$M" --data "$D/qa-train-doc.jsonl" --init "$init" --ratio "$r" --out "$w/qa"
    --stage qa --lr 1e-4 --grad-accum 8 --steps "$steps" --save-every $((steps / 3)) --seed 2 -q
    --eval "$D/qa-held-doc49.jsonl" --eval-max-tokens 24)
  timeout -k 20 "$(left 90)" "$S" train "${qa_args[@]}" --stop-after $((steps / 2))
  mkdir -p "$w/qa-half" && cp "$w/qa/adapter"* "$w/qa-half/" || return
  local label
  label="sac (H200 adapter r$r, $(saved_step "$w/qa/log.jsonl") QA steps)"
  dev_answers "$w/qa-half" "$r" "$label" &
  timeout -k 20 "$(left 75)" "$S" train "${qa_args[@]}" --resume
  label="sac (H200 adapter r$r, $(saved_step "$w/qa/log.jsonl") QA steps)"
  dev_answers "$w/qa" "$r" "$label"
  wait
}

for r in $RATIOS; do
  ratio_run "$r" > "$O/r$r.log" 2>&1 &
done
wait
cat "$DEV"/answers.* > "$O/peers.jsonl"
for r in $RATIOS; do
  tar -C "$O" -czf "$O/r$r.tgz" --exclude checkpoint.safetensors "r$r" && rm -rf "${O:?}/r$r"
done
echo "done in $(($(date +%s) - start)) s"
