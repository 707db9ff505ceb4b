"""What the routes compute from the model's outputs: pure numpy, no I/O, unit-tested without a server.

Embeddings: Matryoshka truncation, then L2 normalisation of the kept dimensions; cosine similarities.
Classification: softmax (single-label), sigmoid (multi-label) or raw logits, then the best labels per
input.
Reranking: sigmoid of the relevance logits (or the logits), and the order of the texts, best first.
"""

import base64

import numpy as np

# Keeps the normalisation of an all-zero row finite (it stays zero).
MIN_NORM = 1e-12


def embedding_matrix(embeddings: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """(N, dim) -> (N, dimensions or dim), float32 and C-contiguous (orjson serialises only those)."""
    # Matryoshka: truncate first, then normalise the kept dimensions.
    matrix = embeddings[:, :dimensions] if dimensions else embeddings
    if normalize:
        norms = np.sqrt(np.einsum("nd,nd->n", matrix, matrix))[:, None]  # (N, 1)
        matrix = matrix / np.maximum(norms, MIN_NORM)
    return np.ascontiguousarray(matrix, dtype=np.float32)


def base64_rows(matrix: np.ndarray) -> list[str]:
    """Each row as little-endian float32 bytes in base64, OpenAI's `encoding_format: base64`."""
    return [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in matrix]


def label_scores(logits: np.ndarray, multi_label: bool, raw_scores: bool) -> np.ndarray:
    """(N, labels) logits -> scores: softmax per row, sigmoid per label if multi-label, or the logits."""
    if raw_scores:
        return logits
    if multi_label:
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # stable: the largest exponent is 0
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_labels(scores: np.ndarray, labels: list[str], top_k: int | None) -> list[list[dict[str, object]]]:
    """Per row, the `top_k` (default: all) labels with their scores, best first; ties keep label order."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, : top_k or len(labels)]
    return [
        [{"label": labels[label], "score": float(row[label])} for label in ranking]
        for row, ranking in zip(scores, order, strict=True)
    ]


def similarities(embeddings: np.ndarray) -> list[float]:
    """Cosine similarity of row 0 of (N, dim) `embeddings` with each later row (/similarity)."""
    unit = embedding_matrix(embeddings, None, normalize=True)
    return [float(value) for value in unit[1:] @ unit[0]]


def relevance_scores(logits: np.ndarray, raw_scores: bool) -> np.ndarray:
    """(N, 1) relevance logits of a reranker -> (N,) scores: sigmoid, or the logits with raw_scores."""
    column = logits[:, 0]
    # sigmoid(x) = (1 + tanh(x / 2)) / 2, without exp's overflow for a very negative logit
    return column if raw_scores else (1 + np.tanh(column / 2)) / 2


def ranked(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Indexes of `scores` (or logits), highest first (ties keep request order), the first `top_n`
    (default all)."""
    return np.argsort(-scores, kind="stable")[:top_n].tolist()
