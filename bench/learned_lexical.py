"""The embedding's lexical channel alone: its table trained on the pairs, as `finetune embed` trains it,
against the random count sketch it starts as (issue 9).

    cd bench && ../.venv/bin/python learned_lexical.py --data ../runs/deb/data \
        --tokenizer ../runs/deb/tokenizer.json

The channel (model/lexical.py, LexicalSketch) projects each text's sublinear TF-IDF vector over the
subword vocabulary (idf over the distinct texts of the pairs) to 768 dims by a table with one row per
token. The table starts as a count sketch (a random sign in a random column per token) and is then
trained on the fine-tune's (query, positive) pairs with the encoder's contrastive loss
(`train_sketch_table`: symmetric InfoNCE, temperature 0.05, in-batch negatives, batches of 256,
Adam 1e-3, `--epochs` passes counted in steps, at least 300). Here it is trained on every pair of
pairs_train.jsonl (the fine-tune holds a tenth out to weigh the channel against the encoder) and both
tables are scored alone on the held-out retrieval split (queries against the whole corpus).

Prints a Markdown table and, as its last line, the result as one JSON object.
"""

import argparse
import copy
import json
from pathlib import Path

from baselines import read_jsonl

from model.data import TokenizedTexts
from model.finetune import build_sketch, read_pairs, sketch_texts, train_sketch_table
from model.lexical import LexicalSketch
from model.metrics import retrieval_metrics
from model.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="pairs_train.jsonl and the retrieval split")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    pairs = read_pairs(args.data / "pairs_train.jsonl")
    learned = build_sketch(pairs, tokenizer, tokenizer.get_vocab_size(), args.dim, args.seed)
    sketch = copy.deepcopy(learned)
    queries = TokenizedTexts.encode(tokenizer, pairs.queries)
    positives = TokenizedTexts.encode(tokenizer, pairs.positives)
    training = train_sketch_table(learned, queries, positives, args.epochs, args.seed)

    test_queries = read_jsonl(args.data / "retrieval_queries.jsonl")
    corpus = read_jsonl(args.data / "retrieval_corpus.jsonl")
    doc_ids = [row["id"] for row in corpus]
    relevant = [set(row["relevant"]) for row in test_queries]
    scores = {}
    channel: LexicalSketch
    for name, channel in (("random count sketch", sketch), ("trained table", learned)):
        query_vectors = sketch_texts(channel, tokenizer, [row["text"] for row in test_queries])
        doc_vectors = sketch_texts(channel, tokenizer, [row["text"] for row in corpus])
        top = (query_vectors @ doc_vectors.T).topk(10, dim=1).indices.tolist()
        scores[name] = retrieval_metrics([[doc_ids[index] for index in row] for row in top], relevant)
    print(
        f"{len(pairs.queries)} training pairs, {training['steps']} steps in {training['seconds']:.0f} s; "
        f"{len(test_queries)} queries"
    )
    print("\n| lexical channel alone | R@1 | R@10 | MRR@10 |\n|---|---:|---:|---:|")
    for name, metrics in scores.items():
        print(
            f"| {name} | {metrics['recall@1']:.3f} | {metrics['recall@10']:.3f} | {metrics['mrr@10']:.3f} |"
        )
    print(json.dumps({"pairs": len(pairs.queries), **training, "scores": scores}))


if __name__ == "__main__":
    main()
