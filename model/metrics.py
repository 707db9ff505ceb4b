"""Evaluation metrics in plain Python, shared by `encoder eval` and bench/baselines.py so that the
model and the baselines are scored by the same code."""

import math


def _f1(true_positive: int, false_positive: int, false_negative: int) -> float:
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else 0.0


def classification_metrics(true: list[str], predicted: list[str]) -> dict[str, float]:
    """Single-label: accuracy and macro-F1 over every label that occurs in `true` or `predicted`."""
    labels = sorted(set(true) | set(predicted))
    macro = 0.0
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(true, predicted, strict=True))
        fp = sum(t != label and p == label for t, p in zip(true, predicted, strict=True))
        fn = sum(t == label and p != label for t, p in zip(true, predicted, strict=True))
        macro += _f1(tp, fp, fn)
    accuracy = sum(t == p for t, p in zip(true, predicted, strict=True)) / len(true)
    return {"accuracy": accuracy, "macro_f1": macro / len(labels)}


def multilabel_metrics(true: list[set[str]], predicted: list[set[str]]) -> dict[str, float]:
    """Multi-label: exact-match accuracy and macro-F1 over labels."""
    labels = sorted(set().union(*true, *predicted))
    macro = 0.0
    for label in labels:
        tp = sum(label in t and label in p for t, p in zip(true, predicted, strict=True))
        fp = sum(label not in t and label in p for t, p in zip(true, predicted, strict=True))
        fn = sum(label in t and label not in p for t, p in zip(true, predicted, strict=True))
        macro += _f1(tp, fp, fn)
    accuracy = sum(t == p for t, p in zip(true, predicted, strict=True)) / len(true)
    return {"accuracy": accuracy, "macro_f1": macro / len(labels) if labels else 0.0}


def retrieval_metrics(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """Recall@k = share of a query's relevant documents in its top k, averaged over queries;
    MRR@10 = mean reciprocal rank of the first relevant document within the top 10 (0 if none)."""
    recall_1 = recall_10 = reciprocal_rank = 0.0
    for ranking, wanted in zip(ranked, relevant, strict=True):
        recall_1 += len(set(ranking[:1]) & wanted) / len(wanted)
        recall_10 += len(set(ranking[:10]) & wanted) / len(wanted)
        reciprocal_rank += next(
            (1 / (rank + 1) for rank, doc in enumerate(ranking[:10]) if doc in wanted), 0.0
        )
    count = len(ranked)
    return {"recall@1": recall_1 / count, "recall@10": recall_10 / count, "mrr@10": reciprocal_rank / count}


def ranking_metrics(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """MRR@10 and nDCG@10 with binary relevance (the reranking report): nDCG@10 = DCG of the top 10,
    sum of 1 / log2(rank + 1) over the relevant documents, divided by that of an ideal ranking."""
    reciprocal_rank = ndcg = 0.0
    for ranking, wanted in zip(ranked, relevant, strict=True):
        top = ranking[:10]
        reciprocal_rank += next((1 / (rank + 1) for rank, doc in enumerate(top) if doc in wanted), 0.0)
        gain = sum(1 / math.log2(rank + 2) for rank, doc in enumerate(top) if doc in wanted)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(10, len(wanted))))
        ndcg += gain / ideal
    count = len(ranked)
    return {"mrr@10": reciprocal_rank / count, "ndcg@10": ndcg / count}
