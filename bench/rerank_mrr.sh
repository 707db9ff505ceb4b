#!/usr/bin/env bash
# The reranking experiment of BENCHMARKS.md ("Reranking"): a cross-encoder fine-tuned from the embed RUN
# (the bi-encoder) reranks the top DEPTH of the bi-encoder and of BM25 on the WordNet retrieval split,
# against each first stage alone (MRR@10, nDCG@10, milliseconds of reranking per query).
#
#   bench/rerank_mrr.sh RUNS [STEPS] [QUERIES]
#
# RUNS holds what `make model` (or bench/recipe.sh) leaves: pretrain/, embed/ and data/ (WordNet's
# pairs_train.jsonl, retrieval_queries.jsonl, retrieval_corpus.jsonl). Defaults: 1200 fine-tuning steps
# of 16 queries (each against its positive, 3 negatives from the bi-encoder's top 50 and 3 in-batch
# ones), the first 1000 queries, DEPTH=50. A rerank RUN already in RUNS/rerank is reused. Prints one JSON object per stage.
set -euo pipefail
RUNS=${1:?usage: bench/rerank_mrr.sh RUNS [STEPS] [QUERIES]}
STEPS=${2:-1200}
QUERIES=${3:-1000}
DEPTH=${DEPTH:-50}
BIN=${BIN:-.venv/bin}
THREADS=${THREADS:-2}
DATA=$RUNS/data

if [ ! -f "$RUNS/rerank/run.json" ]; then
    "$BIN/encoder" finetune rerank --init "$RUNS/embed" --train "$DATA/pairs_train.jsonl" \
        --max-steps "$STEPS" --batch-size 16 --threads "$THREADS" --seed 0 --no-progress \
        --out "$RUNS/rerank" | tail -n 1
fi
for first_stage in "$RUNS/embed" bm25; do
    "$BIN/encoder" eval rerank --model "$RUNS/rerank" --first-stage "$first_stage" --depth "$DEPTH" \
        --limit "$QUERIES" --queries "$DATA/retrieval_queries.jsonl" --corpus "$DATA/retrieval_corpus.jsonl" |
        tail -n 1
done
