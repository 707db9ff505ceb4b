#!/usr/bin/env bash
# The WordNet quality experiment of BENCHMARKS.md: pretrained+fine-tuned vs random-init+fine-tuned
# (same architecture, same fine-tuning budget) vs TF-IDF/BM25 baselines, all in one run.
#
#   bench/wordnet_quality.sh OUT [PRETRAIN_MINUTES] [FINETUNE_MINUTES]
#
# Short budgets on a shared 2-core machine allow only a few hundred steps, hence small batches and
# high learning rates (the same for both initialisations).
# Defaults: 12 minutes of pretraining + 4 minutes per fine-tune = 20 minutes of training for the
# pretrained model. Steps that already have a run.json in OUT are skipped (so a killed run resumes).
# Writes OUT/summary.json and prints it.
set -euo pipefail
OUT=${1:?usage: bench/wordnet_quality.sh OUT [PRETRAIN_MINUTES] [FINETUNE_MINUTES]}
PRETRAIN_MINUTES=${2:-12}
# Pretraining flags (default: the recipe measured in BENCHMARKS.md), e.g. PRETRAIN_FLAGS='--lr 5e-4'
FINETUNE_MINUTES=${3:-4}
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
DATA=$OUT/data

step() {  # step NAME COMMAND...: run unless OUT/NAME/run.json exists, keep the last JSON line
    local name=$1; shift
    if [ ! -f "$OUT/$name/run.json" ]; then
        echo "== $name: $*" >&2
        "$@" --out "$OUT/$name" --seed "$SEED" --threads "$THREADS" --no-progress | tail -n 1 > "$OUT/$name.result.json"
    fi
}
evaluate() {  # evaluate NAME KIND ARGS...: eval into OUT/NAME.eval.json
    local name=$1 kind=$2; shift 2
    "$BIN/encoder" eval "$kind" --model "$OUT/$name" "$@" | tail -n 1 > "$OUT/$name.eval.json"
}

[ -f "$DATA/pretrain.txt" ] || "$BIN/encoder" data wordnet --out "$DATA" > /dev/null
[ -f "$OUT/tokenizer.json" ] || "$BIN/encoder" tokenizer train --corpus "$DATA/pretrain.txt" --vocab-size 8192 \
    --out "$OUT/tokenizer.json" > /dev/null
PRETRAIN_FLAGS=${PRETRAIN_FLAGS:---batch-size 64 --seq-len 32 --lr 2e-3}
# shellcheck disable=SC2086
step pretrain "$BIN/encoder" pretrain --tokenizer "$OUT/tokenizer.json" --corpus "$DATA/pretrain.txt" \
    --preset mini --budget-minutes "$PRETRAIN_MINUTES" $PRETRAIN_FLAGS
step random "$BIN/encoder" pretrain --tokenizer "$OUT/tokenizer.json" --corpus "$DATA/pretrain.txt" \
    --preset mini --max-steps 0
for init in pretrain random; do
    step "$init-classify" "$BIN/encoder" finetune classify --init "$OUT/$init" --train "$DATA/classify_train.jsonl" \
        --budget-minutes "$FINETUNE_MINUTES" --batch-size 32 --lr 1e-3
    step "$init-embed" "$BIN/encoder" finetune embed --init "$OUT/$init" --train "$DATA/pairs_train.jsonl" \
        --budget-minutes "$FINETUNE_MINUTES" --batch-size 64 --lr 5e-4
    evaluate "$init-classify" classify --data "$DATA/classify_test.jsonl"
    evaluate "$init-embed" retrieval --queries "$DATA/retrieval_queries.jsonl" --corpus "$DATA/retrieval_corpus.jsonl"
done
"$BIN/python" bench/baselines.py --data "$DATA" | tail -n 1 > "$OUT/baselines.json"
"$BIN/python" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text())
summary = {
    "pretrain": {k: read("pretrain.result.json")[k] for k in ("steps", "tokens", "tokens_per_s", "final_loss", "train_seconds")},
    "classify": {
        "pretrained+finetuned": read("pretrain-classify.eval.json"),
        "random-init+finetuned": read("random-classify.eval.json"),
        "tfidf+logreg": read("baselines.json")["classify_tfidf_logreg"],
    },
    "retrieval": {
        "pretrained+finetuned": read("pretrain-embed.eval.json"),
        "random-init+finetuned": read("random-embed.eval.json"),
        "bm25": read("baselines.json")["retrieval_bm25"],
        "tfidf_cosine": read("baselines.json")["retrieval_tfidf_cosine"],
    },
    "finetune_steps": {name: read(f"{name}.result.json")["steps"] for name in
                       ("pretrain-classify", "random-classify", "pretrain-embed", "random-embed")},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
EOF
