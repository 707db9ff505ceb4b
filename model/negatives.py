"""Hard negatives, mined with BM25 (the `bm25s` library) for contrastive fine-tuning, or by a first
stage's embedding for a reranker of that first stage.

In-batch negatives are mostly easy (random documents share nothing with the query); a document that
BM25 ranks high for the query but is not its positive shares words with it and teaches the encoder to
look past word overlap. The top few BM25 hits are often unlabelled positives (near-duplicate
documents), so the negative is drawn at random from ranks `skip` to `depth`, not taken from the top.
"""

import random
from collections.abc import Callable

import bm25s
import torch
import torch.nn.functional as F


def mine_bm25_negatives(
    queries: list[str],
    positives: list[str],
    negatives: list[str | None],
    seed: int,
    skip: int = 2,
    depth: int = 20,
    rows: set[int] | None = None,
) -> tuple[list[str | None], int]:
    """Fill missing negatives with a BM25 hit for the query among all the positives: for every row, or
    only for `rows` (the ones training will visit: scoring a query costs a pass over the documents).

    -> (negatives, how many were mined). A query with no other document sharing a word keeps None."""
    documents = list(dict.fromkeys(positives))  # distinct documents, first-seen order
    index = bm25s.BM25()
    index.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    wanted = [
        row for row, negative in enumerate(negatives) if negative is None and (rows is None or row in rows)
    ]
    if not wanted:
        return negatives, 0
    k = min(depth, len(documents))
    hits, scores = index.retrieve(
        bm25s.tokenize([queries[row] for row in wanted], stopwords="en", show_progress=False),
        k=k,
        show_progress=False,
    )
    rng = random.Random(seed)
    filled = list(negatives)
    mined = 0
    for row, ranked, ranked_scores in zip(wanted, hits.tolist(), scores.tolist(), strict=True):
        # A hit that shares no word with the query (score 0) is no harder than an in-batch negative.
        sharing = [documents[i] for i, score in zip(ranked, ranked_scores, strict=True) if score > 0]
        candidates = [doc for doc in sharing[skip:] if doc != positives[row]]
        candidates = candidates or [doc for doc in sharing if doc != positives[row]]
        if candidates:
            filled[row] = rng.choice(candidates)
            mined += 1
    return filled, mined


def first_stage_negatives(
    embed: Callable[[list[str], str], torch.Tensor],
    queries: list[str],
    positives: list[str],
    seed: int,
    depth: int,
    count: int,
    rows: list[int] | None = None,
) -> tuple[list[int], list[list[str]]]:
    """Negatives for a reranker of a first stage (`embed(texts, desc)` -> (N, C), the first stage's
    embedding), as it will see them: each query's top `depth` passages by cosine among all the
    positives. Only rows whose positive is there are kept: the reranker never sees the others, and
    training on them teaches it that what the first stage ranks high is wrong. A positive of any row
    with the same query is relevant too, so it is never a negative. Only `rows` are ranked, when given
    (ranking costs a pass over every passage per query), against all the passages.

    -> (the rows kept, `count` negatives drawn from each kept row's top `depth`)."""
    documents = list(dict.fromkeys(positives))  # distinct documents, first-seen order
    place = {document: index for index, document in enumerate(documents)}
    rows = list(range(len(queries))) if rows is None else rows
    distinct_queries = list(dict.fromkeys(queries[row] for row in rows))
    relevant: dict[str, set[int]] = {}
    for query, positive in zip(queries, positives, strict=True):
        relevant.setdefault(query, set()).add(place[positive])
    document_vectors = F.normalize(embed(documents, "first stage: passages"), dim=1)
    query_vectors = F.normalize(embed(distinct_queries, "first stage: queries"), dim=1)
    k = min(depth, len(documents))
    top: dict[str, list[int]] = {}
    for start in range(0, len(distinct_queries), 1024):
        nearest = (query_vectors[start : start + 1024] @ document_vectors.T).topk(k, dim=1).indices.tolist()
        top.update(zip(distinct_queries[start : start + 1024], nearest, strict=True))
    rng = random.Random(seed)
    kept, negatives = [], []
    for row in rows:
        query, positive = queries[row], positives[row]
        if place[positive] not in top[query]:
            continue
        others = [documents[i] for i in top[query] if i not in relevant[query]]
        kept.append(row)
        negatives.append(rng.sample(others, min(count, len(others))))
    return kept, negatives
