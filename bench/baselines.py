"""Simple baselines on the WordNet demo data, scored by the same metric code as `encoder eval`.

    .venv/bin/python bench/baselines.py --data runs/wordnet

classification: TF-IDF (word 1-2 grams) + logistic regression; retrieval: BM25 and TF-IDF cosine.
Prints one JSON object as its last stdout line.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from model.metrics import classification_metrics, retrieval_metrics


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tfidf_logistic_regression(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform([row["text"] for row in train])
    classifier = LogisticRegression(C=4.0, max_iter=200)
    classifier.fit(features, [row["label"] for row in train])
    predicted = classifier.predict(vectorizer.transform([row["text"] for row in test]))
    return classification_metrics([row["label"] for row in test], list(predicted))


def top_ten(scores: sparse.spmatrix | np.ndarray, doc_ids: list[str]) -> list[list[str]]:
    dense = scores.toarray() if sparse.issparse(scores) else np.asarray(scores)
    top = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    return [[doc_ids[i] for i in row] for row in top]


def bm25_rankings(
    queries: list[str], documents: list[str], doc_ids: list[str], k1: float = 1.2, b: float = 0.75
) -> list[list[str]]:
    counter = CountVectorizer()
    term_counts = counter.fit_transform(documents).tocsr().astype(np.float64)  # (D, V)
    lengths = np.asarray(term_counts.sum(axis=1)).ravel()
    document_frequency = np.asarray((term_counts > 0).sum(axis=0)).ravel()
    idf = np.log(1 + (len(documents) - document_frequency + 0.5) / (document_frequency + 0.5))
    rows, cols = term_counts.nonzero()
    tf = np.asarray(term_counts[rows, cols]).ravel()
    norm = k1 * (1 - b + b * lengths[rows] / lengths.mean())
    weights = sparse.csr_matrix(
        (idf[cols] * tf * (k1 + 1) / (tf + norm), (rows, cols)), shape=term_counts.shape
    )
    query_terms = (counter.transform(queries) > 0).astype(np.float64)  # (Q, V)
    ranked = []
    for start in range(0, len(queries), 500):
        ranked.extend(top_ten(query_terms[start : start + 500] @ weights.T, doc_ids))
    return ranked


def document_frequencies(token_ids: list[list[int]], vocab_size: int) -> np.ndarray:
    """In how many of the texts (token-id lists) each vocabulary id occurs."""
    frequency = np.zeros(vocab_size)
    for ids in token_ids:
        frequency[np.unique(ids)] += 1
    return frequency


def subword_tfidf(token_ids: list[list[int]], idf: np.ndarray) -> sparse.csr_matrix:
    """Sublinear-tf TF-IDF rows over token ids, L2-normalised: the embedding's lexical channel before
    its table projects it (model/lexical.py)."""
    rows, columns, values = [], [], []
    for row, ids in enumerate(token_ids):
        unique, counts = np.unique(ids, return_counts=True)
        rows += [row] * len(unique)
        columns += list(unique)
        values += list(1 + np.log(counts))
    matrix = sparse.csr_matrix((values, (rows, columns)), shape=(len(token_ids), len(idf)))
    matrix = sparse.csr_matrix(matrix @ sparse.diags(idf))
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel()) + 1e-12
    return sparse.csr_matrix(sparse.diags(1 / norms) @ matrix)


def tfidf_cosine_rankings(queries: list[str], documents: list[str], doc_ids: list[str]) -> list[list[str]]:
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    doc_vectors = vectorizer.fit_transform(documents)
    query_vectors = vectorizer.transform(queries)
    ranked = []
    for start in range(0, len(queries), 500):
        ranked.extend(top_ten(query_vectors[start : start + 500] @ doc_vectors.T, doc_ids))
    return ranked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="output of `encoder data wordnet`")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "classify_tfidf_logreg": tfidf_logistic_regression(
            read_jsonl(args.data / "classify_train.jsonl"), read_jsonl(args.data / "classify_test.jsonl")
        )
    }
    queries = read_jsonl(args.data / "retrieval_queries.jsonl")
    corpus = read_jsonl(args.data / "retrieval_corpus.jsonl")
    query_texts = [q["text"] for q in queries]
    relevant = [set(q["relevant"]) for q in queries]
    doc_texts, doc_ids = [d["text"] for d in corpus], [d["id"] for d in corpus]
    results["retrieval_bm25"] = retrieval_metrics(bm25_rankings(query_texts, doc_texts, doc_ids), relevant)
    results["retrieval_tfidf_cosine"] = retrieval_metrics(
        tfidf_cosine_rankings(query_texts, doc_texts, doc_ids), relevant
    )
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
