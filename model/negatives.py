"""Hard negatives for contrastive fine-tuning, mined with BM25 (the `bm25s` library).

In-batch negatives are mostly easy (random documents share nothing with the query); a document that
BM25 ranks high for the query but is not its positive shares words with it and teaches the encoder to
look past word overlap. The top few BM25 hits are often unlabelled positives (near-duplicate
documents), so the negative is drawn at random from ranks `skip` to `depth`, not taken from the top.
"""

import random

import bm25s


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
