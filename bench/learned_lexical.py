"""A learned lexical channel: the TF-IDF vector projected by a table trained on the pairs, against the
random count sketch the embedding uses today (issue 9, exploratory).

    python bench/learned_lexical.py --data runs/deb/data --tokenizer runs/deb/tokenizer.json

The embedding's lexical channel (model/lexical.py, LexicalSketch) count-sketches each text's TF-IDF
vector to 768 dims: token t adds sign[t] * its TF-IDF value to column[t], fixed at random. Here the
same vector is multiplied by a (vocabulary x 768) table that starts as exactly that sketch and is then
trained on the fine-tune's own (query, positive) pairs with the contrastive loss the encoder uses
(symmetric InfoNCE, temperature 0.05, in-batch negatives, batches of 256, Adam 1e-3, `--epochs` passes
counted in steps). It learns which tokens matter and which go together, while the random sketch keeps
every token apart at the price of collisions. Both are scored on the held-out retrieval split (queries
against the whole corpus), alone, with the sketch's idf (over the distinct texts of the pairs) and
truncation (128 tokens).

Prints a Markdown table and, as its last line, the result as one JSON object.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from baselines import document_frequencies, read_jsonl, subword_tfidf
from scipy import sparse
from tokenizers import Tokenizer

from model.metrics import retrieval_metrics
from model.tokenizer import SPECIAL_TOKENS

BATCH = 256
TEMPERATURE = 0.05


def to_torch(matrix: sparse.csr_matrix) -> torch.Tensor:
    coo = matrix.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(coo.data.astype(np.float32)), coo.shape
    ).coalesce()


def project(matrix: sparse.csr_matrix, table: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.sparse.mm(to_torch(matrix), table), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="pairs_train.jsonl and the retrieval split")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    tokenizer.enable_truncation(128)

    def encode(texts: list[str]) -> list[list[int]]:
        return [encoding.ids[1:-1] for encoding in tokenizer.encode_batch(texts)]

    pairs = read_jsonl(args.data / "pairs_train.jsonl")
    distinct = sorted({row["query"] for row in pairs} | {row["positive"] for row in pairs})
    vocab = tokenizer.get_vocab_size()
    idf = np.log((len(distinct) + 1) / (document_frequencies(encode(distinct), vocab) + 1)) + 1
    idf[: len(SPECIAL_TOKENS)] = 0.0  # the special tokens come first in the project's vocabularies
    queries = subword_tfidf(encode([row["query"] for row in pairs]), idf)
    positives = subword_tfidf(encode([row["positive"] for row in pairs]), idf)

    column = torch.from_numpy(rng.integers(0, args.dim, vocab))
    sign = torch.from_numpy((rng.integers(0, 2, vocab) * 2 - 1).astype(np.float32))
    sketch = torch.zeros(vocab, args.dim)
    sketch[torch.arange(vocab), column] = sign
    table = torch.nn.Parameter(sketch.clone())
    optimizer = torch.optim.Adam([table], lr=1e-3)
    steps = int(args.epochs * queries.shape[0] / BATCH)
    started = time.perf_counter()
    labels = torch.arange(BATCH)
    for _ in range(steps):
        rows = rng.choice(queries.shape[0], BATCH, replace=False)
        logits = project(queries[rows], table) @ project(positives[rows], table).T / TEMPERATURE
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started

    test_queries = read_jsonl(args.data / "retrieval_queries.jsonl")
    corpus = read_jsonl(args.data / "retrieval_corpus.jsonl")
    doc_ids = [row["id"] for row in corpus]
    relevant = [set(row["relevant"]) for row in test_queries]
    query_vectors = subword_tfidf(encode([row["text"] for row in test_queries]), idf)
    doc_vectors = subword_tfidf(encode([row["text"] for row in corpus]), idf)
    scores = {}
    with torch.no_grad():
        for name, weights in (("random sketch", sketch), ("learned table", table.detach())):
            similarity = project(query_vectors, weights) @ project(doc_vectors, weights).T
            top = similarity.topk(10, dim=1).indices.tolist()
            ranked = [[doc_ids[index] for index in row] for row in top]
            scores[name] = retrieval_metrics(ranked, relevant)
    print(f"{len(pairs)} training pairs, {steps} steps in {seconds:.0f} s; {len(test_queries)} queries")
    print("\n| lexical channel alone | R@1 | R@10 | MRR@10 |\n|---|---:|---:|---:|")
    for name, metrics in scores.items():
        print(
            f"| {name} | {metrics['recall@1']:.3f} | {metrics['recall@10']:.3f} | {metrics['mrr@10']:.3f} |"
        )
    print(
        json.dumps(
            {"pairs": len(pairs), "steps": steps, "train_seconds": round(seconds, 1), "scores": scores}
        )
    )


if __name__ == "__main__":
    main()
