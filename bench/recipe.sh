#!/usr/bin/env bash
# The training recipe of record, end to end on one data set, scored against the classical baselines:
#
#   bench/recipe.sh OUT [wordnet|debian]
#
# data -> tokenizer -> MLM pretraining -> contrastive fine-tune -> classification heads (linear +
# lexical) on that frozen encoder -> evaluation of both tasks on that one model (what `make model`
# builds) -> TF-IDF + logistic regression and BM25 on the same splits.
# Budgets are steps, so a busy machine changes the time taken, not the result. Every knob is an
# environment variable (the defaults are the CLI's defaults, i.e. the recipe), so an ablation row is
# one variable changed, e.g.  OBJECTIVE=electra bench/recipe.sh runs/ablation-electra
# or  CLASSIFY_FLAGS='--lexical-buckets 0' bench/recipe.sh runs/ablation-no-lexical
# Steps that already have a run.json in OUT are skipped (a killed run resumes). Writes OUT/summary.json.
set -euo pipefail
OUT=${1:?usage: bench/recipe.sh OUT [wordnet|debian]}
DATASET=${2:-wordnet}
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
THREADS=${THREADS:-2}
VOCAB=${VOCAB:-8192}
PRESET=${PRESET:-mini}
OBJECTIVE=${OBJECTIVE:-mlm}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-600}
PRETRAIN_FLAGS=${PRETRAIN_FLAGS:-}
EMBED_STEPS=${EMBED_STEPS:-400}
EMBED_FLAGS=${EMBED_FLAGS:-}
CLASSIFY_FLAGS=${CLASSIFY_FLAGS:-}
DATA=${DATA:-runs/data-$DATASET}
mkdir -p "$OUT"

[ -f "$DATA/pretrain.txt" ] || "$BIN/encoder" data "$DATASET" --out "$DATA" > /dev/null
started=$(date +%s.%N)
[ -f "$OUT/tokenizer.json" ] || "$BIN/encoder" tokenizer train --corpus "$DATA/pretrain.txt" \
    --vocab-size "$VOCAB" --out "$OUT/tokenizer.json" > /dev/null
# shellcheck disable=SC2086
[ -f "$OUT/pretrain/run.json" ] || "$BIN/encoder" pretrain --tokenizer "$OUT/tokenizer.json" \
    --corpus "$DATA/pretrain.txt" --preset "$PRESET" --objective "$OBJECTIVE" --max-steps "$PRETRAIN_STEPS" \
    --seed "$SEED" --threads "$THREADS" --no-progress --out "$OUT/pretrain" $PRETRAIN_FLAGS \
    | tail -n 1 > "$OUT/pretrain.result.json"
# shellcheck disable=SC2086
[ -f "$OUT/embed/run.json" ] || "$BIN/encoder" finetune embed --init "$OUT/pretrain" \
    --train "$DATA/pairs_train.jsonl" --max-steps "$EMBED_STEPS" \
    --seed "$SEED" --threads "$THREADS" --no-progress --out "$OUT/embed" $EMBED_FLAGS \
    | tail -n 1 > "$OUT/embed.result.json"
# shellcheck disable=SC2086
[ -f "$OUT/model/run.json" ] || "$BIN/encoder" finetune classify --init "$OUT/embed" --freeze-encoder \
    --train "$DATA/classify_train.jsonl" --seed "$SEED" --threads "$THREADS" --no-progress \
    --out "$OUT/model" $CLASSIFY_FLAGS | tail -n 1 > "$OUT/model.result.json"
finished=$(date +%s.%N)
"$BIN/encoder" eval classify --model "$OUT/model" --data "$DATA/classify_test.jsonl" | tail -n 1 > "$OUT/classify.eval.json"
"$BIN/encoder" eval retrieval --model "$OUT/model" --queries "$DATA/retrieval_queries.jsonl" \
    --corpus "$DATA/retrieval_corpus.jsonl" | tail -n 1 > "$OUT/retrieval.eval.json"
[ -f "$DATA/baselines.json" ] || "$BIN/python" bench/baselines.py --data "$DATA" | tail -n 1 > "$DATA/baselines.json"
"$BIN/python" - "$OUT" "$DATA" "$started" "$finished" <<'EOF'
import json, sys
from pathlib import Path
out, data, started, finished = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
read = lambda path: json.loads(path.read_text())
pretrain, embed = read(out / "pretrain.result.json"), read(out / "embed.result.json")
model = read(out / "model.result.json")
classify, retrieval = read(out / "classify.eval.json"), read(out / "retrieval.eval.json")
baselines = read(data / "baselines.json")
tfidf, bm25 = baselines["classify_tfidf_logreg"], baselines["retrieval_bm25"]
summary = {
    "out": str(out),
    "classify": {k: round(classify[k], 4) for k in ("accuracy", "macro_f1")},
    "retrieval": {k: round(retrieval[k], 4) for k in ("recall@1", "recall@10", "mrr@10")},
    "vs_baselines": {
        "accuracy": round(classify["accuracy"] / tfidf["accuracy"], 3),
        "macro_f1": round(classify["macro_f1"] / tfidf["macro_f1"], 3),
        "recall@10": round(retrieval["recall@10"] / bm25["recall@10"], 3),
        "mrr@10": round(retrieval["mrr@10"] / bm25["mrr@10"], 3),
    },
    "pretrain": {k: pretrain.get(k) for k in ("objective", "steps", "tokens", "tokens_per_s", "final_loss", "train_seconds")},
    "embed": {k: embed.get(k) for k in ("steps", "tokens", "final_loss", "train_seconds")},
    "heads": {k: model.get(k) for k in ("steps", "final_loss", "train_seconds", "lexical_buckets")},
    "training_wall_minutes": round((finished - started) / 60, 1),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
EOF
