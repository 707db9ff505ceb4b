"""Exact-word evidence next to the encoder: a lexical channel for embeddings and a lexical classifier head.

A small encoder trained for minutes compresses away which exact (sub)words a text contains, and that is
often the strongest evidence there is: BM25 and TF-IDF beat it on most retrieval and topic tasks. Both
modules here add that evidence back inside the exported graph, as table lookups over the input ids.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.data import TokenizedTexts


class LexicalSketch(nn.Module):
    """The text's TF-IDF vector over the tokenizer's vocabulary (sublinear tf), projected to `dim`
    dimensions by a table with one row per token, then L2-normalised.

    The table starts as a count sketch (Charikar et al. 2002): row t is sign[t] in dimension column[t],
    drawn at random. That preserves inner products in expectation, so the cosine of two projections
    estimates the TF-IDF cosine of the two texts, with noise of order 1/sqrt(dim) from hash collisions.
    `train_table` then trains the table on (query, positive) pairs with the encoder's contrastive loss:
    it learns which tokens matter for matching and which go together (synonyms, a word's subwords), which
    no fixed weighting such as BM25's can. Subword tokens make it match across inflections ("owlish"
    shares "owl"). Special tokens and padding carry idf 0.
    """

    def __init__(self, idf: torch.Tensor, dim: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        vocab_size = idf.numel()
        column = torch.randint(0, dim, (vocab_size,), generator=generator)
        sign = torch.randint(0, 2, (vocab_size,), generator=generator).float() * 2 - 1
        self.register_buffer("idf", idf.float().clone())
        # A buffer, not a parameter: only `train_table` trains it, never an optimiser of the encoder.
        self.register_buffer("table", _count_sketch(column, sign, dim))
        self.dim = dim

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], dim: int) -> "LexicalSketch":
        """Rebuild a saved channel; runs saved before the table was learned hold the sketch's columns and
        signs instead of the table."""
        if "table" not in state and {"column", "sign"} <= set(state):
            state = {"idf": state["idf"], "table": _count_sketch(state["column"], state["sign"], dim)}
        sketch = cls(state["idf"], dim)
        sketch.load_state_dict(state)
        return sketch

    def shares(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the token ids (B, T) and each position's share (B, T) of its token's TF-IDF value."""
        return input_ids, occurrence_shares(input_ids, attention_mask.float(), self.idf)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _, share = self.shares(input_ids, attention_mask)
        # A gather and a weighted sum rather than a matrix product, which int8 export would quantise.
        projected = (self.table[input_ids] * share.unsqueeze(-1)).sum(dim=1)  # (B, dim)
        return F.normalize(projected, dim=1)

    def train_table(
        self, queries: TokenizedTexts, positives: TokenizedTexts, steps: int, seed: int
    ) -> dict[str, float]:
        """`steps` steps of symmetric InfoNCE (in-batch negatives, TABLE_TEMPERATURE) of each query's
        projection against its positive's, batches of TABLE_BATCH pairs drawn without replacement,
        Adam at TABLE_LR. -> the first and last steps' losses."""
        # Its product with the table is what `forward` sums, without gathering table rows per position.
        query_matrix, positive_matrix = (
            sparse_shares(tokens, list(range(len(tokens.ids))), self.shares, self.table.shape[0])
            for tokens in (queries, positives)
        )
        rows = query_matrix.shape[0]
        batch = min(TABLE_BATCH, rows)
        table = nn.Parameter(self.table.clone())
        optimizer = torch.optim.Adam([table], lr=TABLE_LR)
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(batch)
        losses = []
        for _ in range(steps):
            chosen = torch.randperm(rows, generator=generator)[:batch]
            query = F.normalize(torch.sparse.mm(query_matrix.index_select(0, chosen), table), dim=1)
            positive = F.normalize(torch.sparse.mm(positive_matrix.index_select(0, chosen), table), dim=1)
            logits = query @ positive.T / TABLE_TEMPERATURE
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            self.table.copy_(table)
        return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else {}


# Training the lexical table (`LexicalSketch.train_table`): the contrastive recipe of the encoder's
# fine-tune, with larger batches (a step is cheap) and a learning rate that moves the table's unit
# entries within a few hundred steps.
TABLE_BATCH = 256
TABLE_LR = 1e-3
TABLE_TEMPERATURE = 0.05


def occurrence_shares(
    features: torch.Tensor, mask: torch.Tensor, idf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> each position's share (B, F) of its feature's sublinear TF-IDF value idf * (1 + log tf), and
    tf (B, F): a feature that occurs tf times in its text carries a 1/tf part of it at each occurrence,
    so that summing over positions gives the TF-IDF vector. Padding (mask 0) carries nothing."""
    same = (features[:, :, None] == features[:, None, :]).float() * mask[:, None, :]  # (B, F, F)
    tf = same.sum(dim=2).clamp(min=1.0)
    return idf[features] * (1.0 + torch.log(tf)) / tf * mask, tf


Shares = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sparse_shares(tokens: TokenizedTexts, rows: list[int], shares: Shares, width: int) -> torch.Tensor:
    """The vectors that `shares` (ids and mask -> feature ids and each position's share) sums, for
    `rows` of `tokens`, as a sparse (rows, width) matrix: what the tables are fitted and trained on."""
    parts = []
    for start in range(0, len(rows), 256):
        input_ids, attention_mask = tokens.batch(rows[start : start + 256])
        features, share = shares(input_ids, attention_mask)
        row_ids = torch.arange(features.shape[0], device=features.device)[:, None].expand_as(features)
        parts.append((row_ids.flatten() + start, features.flatten(), share.flatten()))
    row_ids, features, share = (torch.cat(column) for column in zip(*parts, strict=True))
    keep = share != 0
    indices = torch.stack([row_ids[keep], features[keep]])
    size = (len(rows), width)
    return torch.sparse_coo_tensor(indices, share[keep], size, check_invariants=False).coalesce()


def _count_sketch(column: torch.Tensor, sign: torch.Tensor, dim: int) -> torch.Tensor:
    """(vocabulary, dim) table whose row t is sign[t] in dimension column[t] and 0 elsewhere."""
    table = torch.zeros(column.numel(), dim)
    table[torch.arange(column.numel()), column] = sign.float()
    return table


def hybrid_embedding(dense: torch.Tensor, lexical: torch.Tensor, weight: float) -> torch.Tensor:
    """[dense / |dense|, sqrt(w) * lexical] / sqrt(1 + w): a unit vector whose cosine with another is
    (dense cosine + w * lexical cosine) / (1 + w), a weighted hybrid score from one dot product."""
    return torch.cat([F.normalize(dense, dim=1), math.sqrt(weight) * lexical], dim=1) / math.sqrt(1 + weight)


# A feature seen in fewer training texts than this carries idf 0: it cannot generalise, and it would take
# a share of its text's unit norm from the features that do (scikit-learn's min_df=2 for TF-IDF + LR).
MIN_DOCUMENT_FREQUENCY = 2
BIGRAM_HASH = 1_000_003


def lexical_features(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and mask -> feature ids and mask (B, F): each token, then, when buckets > 0, each
    adjacent pair of real tokens hashed to row vocab_size + (a * BIGRAM_HASH + b) mod buckets."""
    if buckets == 0:
        return input_ids, attention_mask
    bigrams = vocab_size + (input_ids[:, :-1] * BIGRAM_HASH + input_ids[:, 1:]) % buckets
    pair_mask = attention_mask[:, :-1] * attention_mask[:, 1:]
    return torch.cat([input_ids, bigrams], dim=1), torch.cat([attention_mask, pair_mask], dim=1)


def inverse_document_frequencies(
    tokens: TokenizedTexts,
    vocab_size: int,
    special_ids: list[int],
    buckets: int = 0,
    min_document_frequency: int = 0,
) -> torch.Tensor:
    """Smoothed idf = log((N + 1) / (df + 1)) + 1 of every feature of `lexical_features` (the vocabulary,
    then `buckets` hashed bigrams) over the texts; 0 for the special tokens, which say nothing about a
    text's content, and for features seen in fewer than `min_document_frequency` texts."""
    size = vocab_size + buckets
    document_frequency = torch.zeros(size)
    for start in range(0, len(tokens.ids), 1024):
        input_ids, attention_mask = tokens.batch(list(range(start, min(start + 1024, len(tokens.ids)))))
        features, feature_mask = lexical_features(input_ids, attention_mask, vocab_size, buckets)
        real = feature_mask.bool()
        # One count per (text, feature): unique over the keys row * size + feature.
        rows = torch.arange(features.shape[0])[:, None].expand_as(features)
        keys = torch.unique(rows[real] * size + features[real])
        document_frequency += torch.bincount(keys % size, minlength=size)
    idf = torch.log((len(tokens.ids) + 1) / (document_frequency + 1)) + 1
    idf[document_frequency < min_document_frequency] = 0.0
    idf[special_ids] = 0.0
    return idf


class LexicalHead(nn.Module):
    """The wide half of a wide-and-deep classifier (Cheng et al. 2016): a linear model over the text's
    TF-IDF vector of tokens and hashed token bigrams (sublinear tf, L2-normalised), that is TF-IDF +
    logistic regression computed inside the exported graph. It adds exact-word evidence, which a small
    encoder trained for minutes compresses away, for one table lookup at serving time.

    `weight` has one row of class logits per feature; `idf` (`inverse_document_frequencies` with buckets
    and MIN_DOCUMENT_FREQUENCY) is 0 for special tokens and for features seen in fewer training texts;
    padding never counts.
    `tfidf_matrix` builds the same vectors as a sparse matrix for fitting (finetune.py fits the weights
    by L-BFGS, jointly with the linear head on the encoder's features).
    """

    def __init__(self, idf: torch.Tensor, vocab_size: int, n_labels: int) -> None:
        super().__init__()
        self.vocab_size, self.buckets = vocab_size, idf.numel() - vocab_size
        self.register_buffer("idf", idf.float().clone())
        self.weight = nn.Parameter(torch.zeros(idf.numel(), n_labels))

    def shares(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> feature ids (B, F) and each position's share (B, F) of its feature's TF-IDF value, so that
        the TF-IDF vector is the sum of share * one_hot(feature): a feature that occurs tf times carries
        idf * (1 + log tf) / tf at each occurrence, over the vector's L2 norm."""
        features, feature_mask = lexical_features(
            input_ids, attention_mask.float(), self.vocab_size, self.buckets
        )
        share, tf = occurrence_shares(features, feature_mask, self.idf)
        norm = (share * share * tf).sum(dim=1, keepdim=True).clamp(min=1e-12).sqrt()  # each feature once
        return features, share / norm

    def tfidf_matrix(self, tokens: TokenizedTexts, rows: list[int]) -> torch.Tensor:
        """The TF-IDF vectors of `rows` as a sparse (rows, features) matrix, for fitting."""

        def shares(
            input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self.shares(input_ids.to(self.idf.device), attention_mask.to(self.idf.device))

        return sparse_shares(tokens, rows, shares, self.weight.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features, share = self.shares(input_ids, attention_mask)
        return (self.weight[features] * share.unsqueeze(-1)).sum(dim=1)  # (B, n_labels)
